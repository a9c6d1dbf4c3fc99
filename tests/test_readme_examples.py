"""The README's "Use in your own model" code block runs as written: it is executed verbatim (read from the
README, so an edit there is tested) with its free names (``pos_embed``, ``idx``, ``proj``, ``ctx``, …) bound to
small random tensors, and its checkpoint file, ``in1k_vith14_ep300.pth.tar``, a small official-layout checkpoint."""
import copy
import re

import torch

import stop_kernels
from _train_helpers import REPO
from stop_kernels.models import predictor_for, vit_encoder


def readme_block(section: str) -> str:
    text = (REPO / "README.md").read_text()
    assert f"\n## {section}\n" in text, f"README has no section {section!r}"
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", body, re.S)
    assert m, f"README section {section!r} has no python block"
    return m.group(1)


def test_use_in_your_own_model_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    P, E, D, B, Nc, Nt, npred, H, Dh, N = 16, 12, 8, 2, 5, 3, 2, 2, 4, 7  # odd sizes
    enc = vit_encoder("vit_tiny", img_size=32, patch_size=8)
    stop_kernels.save_official_checkpoint("in1k_vith14_ep300.pth.tar", enc,
                                          predictor_for(enc, img_size=32, patch_size=8, predictor_embed_dim=96,
                                                        depth=1), copy.deepcopy(enc), epoch=3)
    names = dict(pos_embed=torch.randn(P, D, generator=g), idx=torch.randint(0, P, (B, Nt), generator=g),
                 proj=torch.nn.Linear(E, D), ctx=torch.randn(B, Nc, E, generator=g),
                 ctx_idx=torch.randint(0, P, (B, Nc), generator=g),
                 tgt_idx=[torch.randint(0, P, (B, Nt), generator=g) for _ in range(npred)],
                 proj_qkv=torch.nn.Linear(D, 3 * H * Dh), H=H, Dh=Dh,
                 **{k: torch.randn(B, N, H, Dh, generator=g) for k in "qkv"})
    exec(compile(readme_block("Use in your own model"), "README.md", "exec"), names)
    assert names["out"].shape == (B, Nt, D)                      # [..., M, D]
    assert names["x"].shape == (npred * B, Nc + Nt, D)           # [npred·B, Nc+Nt, D]
    assert names["o"].shape == (B, N, H, Dh)                     # [B, N, H, Dh]
    back = stop_kernels.load_official_checkpoint("mine.pth.tar")  # the round trip the block writes
    assert back.epoch == 3
    for a, b in ((names["m"].encoder, back.encoder), (names["m"].predictor, back.predictor)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
