"""The zoo's ViT: prompt-token injection on a tiny instance."""

import torch

from reprogram.zoo.vit import Block, ShapesViT


def _tiny() -> ShapesViT:
    torch.manual_seed(0)
    return ShapesViT(num_classes=3, image_size=8, patch=4, dim=8, depth=2, heads=2).eval()


def test_no_prompts_matches_hand_written_forward() -> None:
    m = _tiny()
    x = torch.rand(2, 3, 8, 8)
    h = m.embed(x)
    for b in m.blocks:
        assert isinstance(b, Block)
        a = b.ln1(h)
        h = h + b.attn(a, a, a, need_weights=False)[0]
        h = h + b.mlp(b.ln2(h))
    torch.testing.assert_close(m(x), m.head(m.norm(h[:, 0])))


def test_prompts_change_output_shallow_and_deep() -> None:
    m = _tiny()
    x = torch.rand(2, 3, 8, 8)
    base = m.forward_tokens(x)
    shallow = m.forward_tokens(x, torch.randn(3, 8))
    deep = m.forward_tokens(x, torch.randn(2, 3, 8))
    assert shallow.shape == deep.shape == base.shape
    assert not torch.allclose(shallow, base) and not torch.allclose(deep, base)
