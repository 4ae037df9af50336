"""The zoo's ViT: prompt-token injection on a tiny instance."""

import torch

from reprogram.zoo.vit import Block, ShapesViT


def _tiny() -> ShapesViT:
    torch.manual_seed(0)
    return ShapesViT(num_classes=3, image_size=8, patch=4, width=8, depth=2, heads=2).eval()


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


def test_masked_out_prompt_tokens_leave_the_output_unchanged() -> None:
    m = _tiny()
    x = torch.rand(2, 3, 8, 8)
    base = m.forward_tokens(x)
    for prompts in (torch.randn(3, 8), torch.randn(2, 3, 8)):  # shallow, deep
        masked = m.forward_tokens(x, prompts, mask_prompts=True)
        torch.testing.assert_close(masked, base, atol=1e-5, rtol=1e-5)


def test_the_shipped_vit_is_in_the_zoo() -> None:
    from reprogram.zoo.registry import load_model

    model = load_model("shapes-vit")
    assert model.meta.architecture == "ShapesViT(width=64)"
    assert sum(p.numel() for p in model.module.parameters()) == 208_970
    assert model.module(torch.rand(1, 3, 32, 32)).shape == (1, 10)
