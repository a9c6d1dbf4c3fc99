"""Property-based tests (hypothesis) of the models (``stop_kernels/models/``: the ViT encoder, the StoP predictor,
their FLOP count) and of their conversion to and from the official I-JEPA / StoP checkpoint layout.

Model sizes are drawn instead of listed: widths 8-48, depth 0-2, any head count dividing the width, MLP ratios
other than 4 (48/11 included, and hidden widths whose ratio a float quotient rebuilds one short), 1-3 input
channels, patches of 2-8 px on grids of 1-4 patches per side, the three noise modes, qkv bias on or off,
float32 / float64 / bfloat16 parameters. Every parameter is moved away from its initial value by fresh ``randn`` (a
zero bias or a unit LayerNorm would hide a dropped or swapped term); inputs and masks (repeats allowed, int32 or
int64) are fresh random draws. The contracts checked:

* ``save_official_checkpoint`` / ``load_official_checkpoint`` (module docstring of ``official.py``): the file holds
  the official key layout (``module.`` prefix, ``[1, P, D]`` position tables, no ``qkv.bias`` without a qkv bias:
  the layout written out by hand here, itself checked against the files the official code saved, ``../shared/
  fixtures``), every tensor a float32 copy of the model's; loaded back, the models are "exactly" the models
  written (the same state dict bit for bit, in float32) and compute the same outputs bit for bit on the same
  images, masks and noise (or generator seed).
* the encoder's forward (``vit.py``): ``[B, N, E]`` without masks, ``[nmask·B, K, E]`` in the official
  ``apply_masks`` order with them, equal to the official ViT written out here from its weights (strided
  convolution, the official numpy sin-cos table, pre-norm blocks with exact GELU, LayerNorm eps 1e-6) run on
  each image and each mask alone; whatever the images' memory layout.
* the predictor's forward (``predictor.py``): row ``k·B + b`` is target block k of image b; its input rows are
  ``reference.assemble_predictor_input``'s, and those are the ones written out here (context rows
  ``x·Wᵀ + b + ψ[ctx]``, masked rows ``ψ[t] + n·Wᵀ + b`` / ``ψ[t] + n`` / ``ψ[t] + mask_token``); the masks
  and the noise in each layout the predictor takes. The noise a generator gives is the Philox noise of the seed
  it draws (``philox_normal(draw_seed(g), ...)`` scaled by σ; the official ``torch.randn`` on the "unfused" input
  backend); mode "none" and σ = 0 draw nothing (the generator's state is left as it was) and are deterministic.
* ``reset_parameters`` after ``to_empty`` on the meta device (README, "Use in your own model"): the constructor's
  shapes and dtypes, finite values, zero biases, unit LayerNorms, std-0.02 weights, the official sin-cos tables.
* ``flops.jepa_step_flops`` (its module docstring): the matmul FLOPs of each part of a training step as
  ``torch.utils.flop_counter.FlopCounterMode`` counts them on the same tiny step (attention through the reference
  backend, its two products as ``bmm``, which the counter sees; a patch of C·p² pixels a multiple of 8, where
  the patch GEMM runs unpadded); ``attention_cost``'s FLOPs and bytes against the same counter and the sizes of
  the tensors a flash forward and backward read and write.
* bad constructor arguments (a bool as a size, a head count that does not divide the width, a negative depth, an
  unknown preset or noise mode, …): ``ValueError`` / ``TypeError`` whose message starts with the argument's name.

Two defects found here are fixed, and their examples stay at the end of the file as regression tests: a
parametrized ``predictor_embed`` (which the predictor supports) was written under non-official keys, and an MLP
ratio below 1 / width built the zero-width MLP that mlp_ratio 0 is refused for.

Examples come from the profile in ``conftest.py`` (the same on every run). Every test runs in ``cpu_train``'s
setting (conftest): the reference (not interpreted) StoP paths and one thread, since the models' ops are tiny
(a 16-wide LayerNorm took 10 ms on two busy cores with two threads, 12 µs with one).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import skip_unless_installed

skip_unless_installed("hypothesis", module_level=True)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from stop_kernels import reference  # noqa: E402
from stop_kernels.models import (VisionTransformer, VisionTransformerPredictor, flops,  # noqa: E402
                                 infer_encoder_sizes, load_official_checkpoint, predictor_for,
                                 save_official_checkpoint, vit_encoder, vit_predictor)
from stop_kernels.models.official import strip_prefix  # noqa: E402
from stop_kernels.ops.attention import use_attention_backend  # noqa: E402
from stop_kernels.ops.philox import draw_seed, philox_normal  # noqa: E402

pytestmark = pytest.mark.usefixtures("cpu_train")

F64 = torch.float64
WIDTHS = (8, 12, 16, 24, 28, 32, 44, 48)
PRED_WIDTHS = (8, 12, 16, 24, 32, 44)
MLP_RATIOS = (4.0, 1.0, 2.5, 48 / 11, 0.75, 3.3)
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
EPS = 1e-6  # the official blocks' LayerNorm eps


# ------------------------------------------------------------------------------------------------ strategies
def _heads(draw, width: int) -> int:
    return draw(st.sampled_from([h for h in range(1, min(width, 8) + 1) if width % h == 0]))


def _mlp_ratio(draw, width: int) -> float:
    """A preset's ratio, or (hidden + u) / width for a drawn hidden width: with u = 0 the float quotient can build
    hidden − 1 (28 · (61 / 28) = 60.99…); with u = 0.5 it builds hidden, whose ratio a loader must then rebuild
    (hidden / width builds hidden − 1 for these "trap" widths, e.g. 15 / 44 · 44 = 14.99…: drawn on purpose)."""
    kind = draw(st.sampled_from(["preset", "quotient", "trap"]))
    traps = [h for h in range(1, 4 * width + 1) if int(width * (h / width)) != h]
    if kind == "preset":
        return draw(st.sampled_from(MLP_RATIOS))
    if kind == "trap" and traps:
        return (draw(st.sampled_from(traps)) + 0.5) / width
    return (draw(st.integers(1, 4 * width)) + draw(st.sampled_from([0.0, 0.5]))) / width


@st.composite
def model_configs(draw, dtypes=DTYPES, modes=reference.NOISE_MODES):
    """Constructor arguments of an encoder and a matching predictor, plus a dtype and a seed."""
    E = draw(st.sampled_from(WIDTHS))
    patch = draw(st.integers(2, 8))
    grid = draw(st.integers(1, max(1, min(4, 32 // patch))))
    enc = dict(img_size=grid * patch, patch_size=patch, in_chans=draw(st.integers(1, 3)), embed_dim=E,
               depth=draw(st.integers(0, 2)), num_heads=_heads(draw, E), mlp_ratio=_mlp_ratio(draw, E),
               qkv_bias=draw(st.booleans()))
    D = draw(st.sampled_from(PRED_WIDTHS))
    mode = draw(st.sampled_from(modes))
    pred = dict(num_patches=grid * grid, embed_dim=E, predictor_embed_dim=D, depth=draw(st.integers(0, 2)),
                num_heads=_heads(draw, D), mlp_ratio=_mlp_ratio(draw, D), qkv_bias=draw(st.booleans()),
                noise_mode=mode, noise_std=draw(st.sampled_from([0.0, 0.25, 0.6])))
    return dict(enc=enc, pred=pred, dtype=draw(st.sampled_from(dtypes)), seed=draw(st.integers(0, 2 ** 31)))


def _build(cfg, g: torch.Generator, *, target: bool = False):
    """The encoder, predictor (and a target encoder) of ``cfg``, every parameter and table moved off its initial
    value by fresh randn (the tables too: a loader that rebuilt them instead of loading them would show)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        models = [VisionTransformer(**cfg["enc"]), VisionTransformerPredictor(**cfg["pred"])]
        if target:
            models.append(VisionTransformer(**cfg["enc"]))
    for m in models:
        _perturb(m, g)
    return [m.to(cfg["dtype"]) for m in models]


def _perturb(module, g: torch.Generator, scale: float = 0.3):
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            t.add_(torch.randn(t.shape, generator=g, dtype=F64).to(t.dtype) * scale)


def _masks(g: torch.Generator, B: int, P: int, n: int, K: int, dtype=torch.int64):
    """``n`` index tensors ``[B, K]`` in [0, P), repeats allowed."""
    return [torch.randint(0, P, (B, K), generator=g).to(dtype) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ the official model
def _official_sincos(dim: int, grid: int) -> torch.Tensor:
    """The official ``get_2d_sincos_pos_embed(dim, grid)`` (numpy float64, then the float32 parameter), written
    out: ``np.meshgrid(grid_w, grid_h)`` feeds its first (column) plane to the first half of the channels."""
    def one(d, pos):
        omega = torch.arange(d // 2, dtype=F64) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)
    ax = torch.arange(grid, dtype=F64)
    cols, rows = torch.meshgrid(ax, ax, indexing="xy")  # np.meshgrid's default: cols[i, j] = j
    return torch.cat([one(dim // 2, cols), one(dim // 2, rows)], dim=1).float()


def _block(x, sd, pre: str, heads: int):
    """The official pre-norm block on ``x[N, C]``: x + proj(attn(LN1 x)), then + fc2(GELU(fc1(LN2 x))), with the
    qkv projection's output read as [N, 3, heads, Dh] (the official reshape before permute(2, 0, 3, 1, 4))."""
    N, C = x.shape
    Dh = C // heads
    h = F.layer_norm(x, (C,), sd[pre + "norm1.weight"], sd[pre + "norm1.bias"], eps=EPS)
    qkv = h @ sd[pre + "attn.qkv.weight"].T
    if pre + "attn.qkv.bias" in sd:
        qkv = qkv + sd[pre + "attn.qkv.bias"]
    q, k, v = qkv.reshape(N, 3, heads, Dh).permute(1, 2, 0, 3)  # each [heads, N, Dh]
    att = torch.softmax(q @ k.transpose(-1, -2) * Dh ** -0.5, dim=-1) @ v
    x = x + att.transpose(0, 1).reshape(N, C) @ sd[pre + "attn.proj.weight"].T + sd[pre + "attn.proj.bias"]
    h = F.layer_norm(x, (C,), sd[pre + "norm2.weight"], sd[pre + "norm2.bias"], eps=EPS)
    h = F.gelu(h @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"])  # exact (erf) GELU
    return x + h @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"]


def _depth(sd, prefix: str) -> int:
    return len({k.split(".")[1] for k in sd if k.startswith(prefix + ".")})


def _official_encoder(sd, img: torch.Tensor, keep, heads: int) -> torch.Tensor:
    """The official ViT on one image ``[C, H, W]``: strided convolution, + pos_embed, the kept tokens (all when
    ``keep`` is None), the blocks, LayerNorm → ``[K, E]``."""
    p = sd["patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(img[None], sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2)[0] + sd["pos_embed"].reshape(x.shape[2] * x.shape[3], -1)
    if keep is not None:
        x = x[keep.long()]
    for i in range(_depth(sd, "blocks")):
        x = _block(x, sd, f"blocks.{i}.", heads)
    return F.layer_norm(x, (x.shape[1],), sd["norm.weight"], sd["norm.bias"], eps=EPS)


def _official_rows(sd, x, ctx, tgt, mode, noise):
    """The predictor's input rows written out: ``[npred·B, Nc+Nt, D]``, row k·B + b = [x_b·Wᵀ + b + ψ[ctx_b] ;
    ψ[tgt_k,b] + (n·Wᵀ + b | n | mask_token)] (``noise`` [npred, B, Nt, E or D])."""
    W, bias = sd["predictor_embed.weight"], sd["predictor_embed.bias"]
    pos = sd["predictor_pos_embed"].reshape(-1, W.shape[0])
    rows = []
    for k, t in enumerate(tgt):
        for b in range(x.shape[0]):
            c = x[b] @ W.T + bias + pos[ctx[b].long()]
            m = pos[t[b].long()]
            if mode == "learned":
                m = m + noise[k, b] @ W.T + bias
            elif mode == "isotropic":
                m = m + noise[k, b]
            else:
                m = m + sd["mask_token"].reshape(-1)
            rows.append(torch.cat([c, m]))
    return torch.stack(rows)


def _official_predictor(sd, x, ctx, tgt, heads: int, mode: str, noise) -> torch.Tensor:
    """The official predictor on the rows of :func:`_official_rows`, each sequence alone → ``[npred·B, Nt, E]``."""
    out = []
    for z in _official_rows(sd, x, ctx, tgt, mode, noise):
        for i in range(_depth(sd, "predictor_blocks")):
            z = _block(z, sd, f"predictor_blocks.{i}.", heads)
        z = F.layer_norm(z, (z.shape[1],), sd["predictor_norm.weight"], sd["predictor_norm.bias"], eps=EPS)
        out.append(z[x.shape[1]:] @ sd["predictor_proj.weight"].T + sd["predictor_proj.bias"])
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------ the official layout
def _official_block_layout(pre, C, hidden, qkv_bias):
    out = {pre + "norm1.weight": (C,), pre + "norm1.bias": (C,), pre + "attn.qkv.weight": (3 * C, C)}
    if qkv_bias:
        out[pre + "attn.qkv.bias"] = (3 * C,)
    out.update({pre + "attn.proj.weight": (C, C), pre + "attn.proj.bias": (C,), pre + "norm2.weight": (C,),
                pre + "norm2.bias": (C,), pre + "mlp.fc1.weight": (hidden, C), pre + "mlp.fc1.bias": (hidden,),
                pre + "mlp.fc2.weight": (C, hidden), pre + "mlp.fc2.bias": (C,)})
    return out


def official_encoder_layout(*, E, depth, P, C, p, hidden, qkv_bias):
    """Key → shape of an official encoder state dict (as the official ``vision_transformer.py`` + DDP save it)."""
    out = {"pos_embed": (1, P, E), "patch_embed.proj.weight": (E, C, p, p), "patch_embed.proj.bias": (E,)}
    for i in range(depth):
        out.update(_official_block_layout(f"blocks.{i}.", E, hidden, qkv_bias))
    out.update({"norm.weight": (E,), "norm.bias": (E,)})
    return {"module." + k: v for k, v in out.items()}


def official_predictor_layout(*, E, D, depth, P, hidden, qkv_bias):
    """Key → shape of an official predictor state dict."""
    out = {"predictor_pos_embed": (1, P, D), "mask_token": (1, 1, D), "predictor_embed.weight": (D, E),
           "predictor_embed.bias": (D,)}
    for i in range(depth):
        out.update(_official_block_layout(f"predictor_blocks.{i}.", D, hidden, qkv_bias))
    out.update({"predictor_norm.weight": (D,), "predictor_norm.bias": (D,), "predictor_proj.weight": (E, D),
                "predictor_proj.bias": (E,)})
    return {"module." + k: v for k, v in out.items()}


def _layouts(cfg):
    e, p = cfg["enc"], cfg["pred"]
    P = p["num_patches"]
    enc = official_encoder_layout(E=e["embed_dim"], depth=e["depth"], P=P, C=e["in_chans"], p=e["patch_size"],
                                  hidden=int(e["embed_dim"] * e["mlp_ratio"]), qkv_bias=e["qkv_bias"])
    pred = official_predictor_layout(E=e["embed_dim"], D=p["predictor_embed_dim"], depth=p["depth"], P=P,
                                     hidden=int(p["predictor_embed_dim"] * p["mlp_ratio"]), qkv_bias=p["qkv_bias"])
    return enc, pred


@pytest.mark.parametrize("name", ["official_stop_small.pt", "official_ijepa_small.pt"])
def test_the_layout_written_out_here_is_the_official_codes(official_fixture, name):
    """The key layout the round trip below expects (:func:`official_encoder_layout`,
    :func:`official_predictor_layout`) is the one of the checkpoints the official code saved: every key, with its
    shape, and float32 (the fixtures' sizes: E 64, depth 2, 8x8 patches of 8 px, 3 channels, MLP
    ratio 4, qkv bias; predictor width 32, depth 2)."""
    ck = official_fixture(name)["checkpoint"]
    enc = official_encoder_layout(E=64, depth=2, P=64, C=3, p=8, hidden=256, qkv_bias=True)
    pred = official_predictor_layout(E=64, D=32, depth=2, P=64, hidden=128, qkv_bias=True)
    for part, want in (("encoder", enc), ("target_encoder", enc), ("predictor", pred)):
        got = {k: tuple(v.shape) for k, v in ck[part].items()}
        assert got == want, part  # (the key order is the code's: I-JEPA's predictor lists mask_token first)
        assert all(v.dtype == torch.float32 for v in ck[part].values())


# ------------------------------------------------------------------------------------------------ round trip
@settings(max_examples=60)
@given(cfg=model_configs(), target=st.booleans(), epoch=st.one_of(st.none(), st.integers(0, 10 ** 6)),
       B=st.integers(1, 2), npred=st.integers(1, 2), data=st.data())
def test_official_round_trip_is_exact(tmp_path, cfg, target, epoch, B, npred, data):
    """save_official_checkpoint writes the official layout (keys, shapes, float32 copies of the model's tensors,
    the position tables as [1, P, D]) and the epoch; load_official_checkpoint (given the heads, the noise mode and
    σ, which the layout does not store) rebuilds models of the drawn sizes holding the same state dict bit for bit
    (float32: a float64 or bfloat16 model comes back as its float32 cast), float32 trainable CPU parameters; on
    fresh images, masks (repeats allowed) and noise, or the same generator seed, they compute the float32
    originals' outputs bit for bit."""
    g = torch.Generator().manual_seed(cfg["seed"])
    models = _build(cfg, g, target=target)
    enc, pred = models[:2]
    tgt = models[2] if target else None
    e, p = cfg["enc"], cfg["pred"]
    path = save_official_checkpoint(tmp_path / "ck.pth.tar", enc, pred, tgt, epoch=epoch)

    ck = torch.load(path, weights_only=True)
    parts = {"encoder": enc, "predictor": pred, **({"target_encoder": tgt} if target else {})}
    assert set(ck) == set(parts) | ({"epoch"} if epoch is not None else set())
    enc_layout, pred_layout = _layouts(cfg)
    for part, model in parts.items():
        want = pred_layout if part == "predictor" else enc_layout
        assert {k: tuple(v.shape) for k, v in ck[part].items()} == want, part
        for k, v in ck[part].items():
            own = model.get_parameter(k[7:]) if k[7:] in dict(model.named_parameters()) else model.get_buffer(k[7:])
            assert v.dtype == torch.float32 and v.is_contiguous(), (part, k)
            assert torch.equal(v, own.detach().float().reshape(v.shape)), (part, k)
    sizes = infer_encoder_sizes(strip_prefix(ck["encoder"]))
    assert (sizes.embed_dim, sizes.depth, sizes.patch_size, sizes.img_size, sizes.in_chans) == \
        (e["embed_dim"], e["depth"], e["patch_size"], e["img_size"], e["in_chans"])
    if e["depth"]:
        assert sizes.qkv_bias == e["qkv_bias"] and round(sizes.mlp_ratio * e["embed_dim"]) == \
            int(e["embed_dim"] * e["mlp_ratio"])

    heads = e["num_heads"]
    m = load_official_checkpoint(path, num_heads=heads, noise_mode=p["noise_mode"], noise_std=p["noise_std"],
                                 predictor_num_heads=None if p["num_heads"] == heads else p["num_heads"])
    assert m.epoch == epoch and (m.target_encoder is None) == (not target)
    loaded = {"encoder": m.encoder, "predictor": m.predictor,
              **({"target_encoder": m.target_encoder} if target else {})}
    ref = {k: (v if cfg["dtype"] == torch.float32 else copy.deepcopy(v).float()) for k, v in parts.items()}
    for part, model in loaded.items():
        got, want = model.state_dict(), ref[part].state_dict()
        assert list(got) == list(want), part
        for k in want:
            assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), (part, k)
        assert all(t.device.type == "cpu" and t.dtype == torch.float32 and t.requires_grad
                   for t in model.parameters()), part
    for blocks, h in ((m.encoder.blocks, heads), (m.predictor.predictor_blocks, p["num_heads"])):
        assert all(b.attn.num_heads == h for b in blocks)
    assert (m.predictor.noise_mode, m.predictor.noise_std) == (p["noise_mode"], p["noise_std"])

    # the same outputs: images, masks and noise drawn fresh
    P = p["num_patches"]
    imgs = torch.randn(B, e["in_chans"], e["img_size"], e["img_size"], generator=g)
    Nc, Nt = data.draw(st.integers(1, P + 1)), data.draw(st.integers(1, P + 1))
    ctx, tgt_idx = _masks(g, B, P, 1, Nc)[0], _masks(g, B, P, npred, Nt)
    width = {"learned": e["embed_dim"], "isotropic": p["predictor_embed_dim"]}.get(p["noise_mode"])
    noise = None if width is None else torch.randn(npred, B, Nt, width, generator=g) * 0.5
    seed = int(torch.randint(0, 2 ** 31, (), generator=g))
    with torch.no_grad():
        for part in [k for k in loaded if k != "predictor"]:
            assert torch.equal(loaded[part](imgs), ref[part](imgs)), part
            assert torch.equal(loaded[part](imgs, [ctx]), ref[part](imgs, [ctx])), part
        z = ref["encoder"](imgs, [ctx])
        for kw in ({"noise": noise}, {"generator": torch.Generator().manual_seed(seed)}):
            want = ref["predictor"](z, [ctx], tgt_idx, **kw)
            kw = {k: (torch.Generator().manual_seed(seed) if k == "generator" else v) for k, v in kw.items()}
            assert torch.equal(m.predictor(z, [ctx], tgt_idx, **kw), want)


# ------------------------------------------------------------------------------------------------ encoder
@settings(max_examples=80)
@given(cfg=model_configs(dtypes=(F64,)), B=st.integers(1, 3), nmask=st.integers(0, 3),
       idx_dtype=st.sampled_from([torch.int64, torch.int32]), layout=st.sampled_from(["contiguous", "channels_last",
                                                                                     "strided"]), data=st.data())
def test_encoder_is_the_official_vit_on_each_image_and_mask(cfg, B, nmask, idx_dtype, layout, data):
    """``enc(imgs)`` is ``[B, N, E]`` and ``enc(imgs, masks)`` (a list of nmask ``[B, K]`` masks, repeats allowed,
    or one bare ``[B, K]`` tensor) is ``[nmask·B, K, E]`` whose row k·B + b is the
    official ViT (written out here from the weights: strided convolution, + the position table, pre-norm blocks,
    exact GELU, LayerNorm eps 1e-6) on image b and mask k alone, float64; the images may be channels-last
    or a strided view. At depth 0 (every op per token) the masked output is the unmasked one gathered."""
    g = torch.Generator().manual_seed(cfg["seed"])
    enc = _build(cfg, g)[0].eval()
    e = cfg["enc"]
    N = enc.num_patches
    imgs = torch.randn(B, e["in_chans"], e["img_size"], e["img_size"], generator=g, dtype=F64)
    if layout == "channels_last":
        imgs = imgs.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        wide = torch.randn(B, e["in_chans"] + 1, e["img_size"], 2 * e["img_size"], generator=g, dtype=F64)
        imgs = wide[:, 1:, :, ::2]
    sd = enc.state_dict()
    heads = e["num_heads"]
    with torch.no_grad():
        full = enc(imgs)
        assert full.shape == (B, N, e["embed_dim"]) and full.dtype == F64
        want = torch.stack([_official_encoder(sd, imgs[b], None, heads) for b in range(B)])
        torch.testing.assert_close(full, want, rtol=1e-9, atol=1e-10)
        if nmask == 0:
            return
        K = data.draw(st.integers(1, N + 2))
        masks = _masks(g, B, N, nmask, K, idx_dtype)
        arg = masks if nmask > 1 or data.draw(st.booleans(), label="list form") else masks[0]
        out = enc(imgs, arg)
        assert out.shape == (nmask * B, K, e["embed_dim"])
        for k in range(nmask):
            for b in range(B):
                torch.testing.assert_close(out[k * B + b], _official_encoder(sd, imgs[b], masks[k][b], heads),
                                           rtol=1e-9, atol=1e-10)
        if e["depth"] == 0:
            assert torch.equal(out, torch.cat([full[torch.arange(B)[:, None], m.long()] for m in masks]))


# ------------------------------------------------------------------------------------------------ predictor
@settings(max_examples=80)
@given(cfg=model_configs(dtypes=(F64,)), B=st.integers(1, 3), npred=st.integers(1, 3), Nc=st.integers(0, 6),
       Nt=st.integers(0, 6), idx_dtype=st.sampled_from([torch.int64, torch.int32]), data=st.data())
def test_predictor_is_the_official_predictor_in_block_major_order(cfg, B, npred, Nc, Nt, idx_dtype, data):
    """``pred(x[B, Nc, E], masks_x, masks, noise=n)`` is ``[npred·B, Nt, E]``, row k·B + b the official predictor on
    image b's context and its k-th target block alone (float64, given the noise: ``[npred, B, Nt, E]`` learned,
    ``[npred, B, Nt, D]`` isotropic, as a stacked tensor or the official per-block list; none in mode "none");
    the input rows (``pred.assemble``) are ``reference.assemble_predictor_input``'s and the ones written out here.
    The masks in each layout the predictor takes (``[B, Nc]`` or ``[[B, Nc]]``; a list of ``[B, Nt]``, a stacked
    ``[npred, B, Nt]``, a bare ``[B, Nt]`` for one block), repeats allowed, int32 or int64; Nc and Nt may be 0."""
    g = torch.Generator().manual_seed(cfg["seed"])
    pred = _build(cfg, g)[1].eval()
    p = cfg["pred"]
    P, E, D, mode = p["num_patches"], p["embed_dim"], p["predictor_embed_dim"], p["noise_mode"]
    x = torch.randn(B, Nc, E, generator=g, dtype=F64)
    ctx = torch.randint(0, P, (B, Nc), generator=g).to(idx_dtype)
    tgt = _masks(g, B, P, npred, Nt, idx_dtype)
    width = {"learned": E, "isotropic": D}.get(mode)
    noise = None if width is None else torch.randn(npred, B, Nt, width, generator=g, dtype=F64)
    sd = pred.state_dict()
    want_rows = _official_rows(sd, x, ctx, tgt, mode, noise)
    ctx_arg = data.draw(st.sampled_from([ctx, [ctx]]), label="masks_x form")
    tgt_arg = data.draw(st.sampled_from([tgt, torch.stack(tgt)] + ([tgt[0]] if npred == 1 else [])), label="masks form")
    noise_arg = None if noise is None else data.draw(st.sampled_from([noise, list(noise)]), label="noise form")
    with torch.no_grad():
        rows = pred.assemble(x, ctx_arg, tgt_arg, noise=noise_arg)
        assert rows.shape == (npred * B, Nc + Nt, D)
        torch.testing.assert_close(rows, want_rows, rtol=1e-12, atol=1e-12)
        ref_rows = reference.assemble_predictor_input(
            x, ctx, tgt, sd["predictor_embed.weight"], sd["predictor_embed.bias"], sd["predictor_pos_embed"],
            noise_mode=mode, noise_std=p["noise_std"], mask_token=sd["mask_token"], noise=noise)
        torch.testing.assert_close(ref_rows, want_rows, rtol=1e-12, atol=1e-12)
        out = pred(x, ctx_arg, tgt_arg, noise=noise_arg)
        assert out.shape == (npred * B, Nt, E) and out.dtype == F64
        torch.testing.assert_close(out, _official_predictor(sd, x, ctx, tgt, p["num_heads"], mode, noise),
                                   rtol=1e-9, atol=1e-10)


@settings(max_examples=80)
@given(cfg=model_configs(dtypes=(F64, torch.float32)), B=st.integers(1, 2), npred=st.integers(1, 3),
       Nc=st.integers(1, 5), Nt=st.integers(1, 5), sigma=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
       backend=st.sampled_from(["auto", "reference", "unfused"]), s=st.integers(0, 2 ** 40))
def test_predictor_noise_comes_from_the_generator_given(cfg, B, npred, Nc, Nt, sigma, backend, s):
    """With a generator and no explicit noise, the predictor's output is its output given the noise that generator
    gives, rows in (k, b, t) order, width E (learned) or D (isotropic), scaled by the predictor's σ: the Philox
    noise of the seed it draws (``philox_normal(draw_seed(g), npred·B·Nt, width, σ)``) on the "auto" and
    "reference" input backends, the official code's ``torch.randn(npred, B, Nt, width) · σ`` on "unfused". The
    same generator state gives the same output bit for bit, another state another output (σ > 0), and the global
    stream is left alone. Mode "none" and σ = 0 draw no seed (the generator's state is left as it was; "unfused"
    draws its randn whatever σ, as the official code) and their output is the mask-token / zero-noise one,
    whatever the generator. float64 and float32 (to float32 rounding)."""
    g = torch.Generator().manual_seed(cfg["seed"])
    pred = _build(cfg, g)[1].eval()
    pred.noise_std, pred.input_backend = sigma, backend
    p = cfg["pred"]
    dt, mode = cfg["dtype"], p["noise_mode"]
    P, E, D = p["num_patches"], p["embed_dim"], p["predictor_embed_dim"]
    x = torch.randn(B, Nc, E, generator=g, dtype=F64).to(dt)
    ctx, tgt = _masks(g, B, P, 1, Nc)[0], _masks(g, B, P, npred, Nt)
    width = {"learned": E, "isotropic": D}.get(mode)
    noisy = width is not None and sigma > 0
    draws = noisy or (width is not None and backend == "unfused")
    tol = dict(rtol=1e-9, atol=1e-10) if dt == F64 else dict(rtol=2e-4, atol=2e-5)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(s)
        state, global_state = gen.get_state(), torch.random.get_rng_state()
        out = pred(x, [ctx], tgt, generator=gen)
        assert torch.equal(torch.random.get_rng_state(), global_state), "the global stream is left alone"
        assert torch.equal(gen.get_state(), state) != draws, "drawn from the generator iff the call draws noise"
        if width is None:
            noise = None
        elif backend == "unfused":
            noise = torch.randn(npred, B, Nt, width, generator=torch.Generator().manual_seed(s), dtype=dt) * sigma
        elif noisy:
            noise = philox_normal(draw_seed(torch.Generator().manual_seed(s)), npred * B * Nt, width, sigma)
            noise = noise.reshape(npred, B, Nt, width)
        else:
            noise = torch.zeros(npred, B, Nt, width, dtype=F64)
        sd = {k: v.double() for k, v in pred.state_dict().items()}
        want = _official_predictor(sd, x.double(), ctx, tgt, p["num_heads"], mode,
                                   None if noise is None else noise.double())
        torch.testing.assert_close(out.double(), want, **tol)
        again = pred(x, [ctx], tgt, generator=torch.Generator().manual_seed(s))
        assert torch.equal(again, out), "same generator state, same output"
        other = pred(x, [ctx], tgt, generator=torch.Generator().manual_seed(s + 1))
        if noisy:
            assert not torch.allclose(other, out), "another seed, other noise"
        else:
            assert torch.equal(other, out), "nothing random: any generator gives the same output"


# ------------------------------------------------------------------------------------------------ meta device
@settings(max_examples=40)
@given(cfg=model_configs())
def test_meta_built_models_initialise_with_reset_parameters(cfg):
    """A model built on the meta device and given storage with ``to_empty`` (here filled with NaN, what that memory
    may hold) is initialised by ``reset_parameters()``: the constructor's keys, shapes and dtypes, every value
    finite, zero biases, unit LayerNorm weights, the official sin-cos tables (the constructor's too), and the
    Linear / Conv2d weights and the mask token drawn with std 0.02 (pooled over the model, within [0.012, 0.028]
    where 200+ values are pooled; none beyond 10 std). reset_parameters on a trained (perturbed) model restores
    the same."""
    dt = cfg["dtype"]
    g = torch.Generator().manual_seed(cfg["seed"])
    e = cfg["enc"]
    grid = e["img_size"] // e["patch_size"]
    for i, kw in enumerate((cfg["enc"], cfg["pred"])):
        cls = VisionTransformer if i == 0 else VisionTransformerPredictor
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg["seed"])
            built = cls(**kw).to(dt)
        with torch.device("meta"):
            meta = cls(**kw).to(dt)
        meta.to_empty(device="cpu")
        with torch.no_grad():
            for t in list(meta.parameters()) + list(meta.buffers()):
                t.fill_(float("nan"))
        _perturb(built, g)
        for model in (meta, built):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg["seed"] + 1)
                model.reset_parameters()
            want = cls(**kw).to(dt).state_dict()
            got = model.state_dict()
            assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}
            assert all(t.device.type == "cpu" and t.requires_grad for t in model.parameters())
            pooled = []
            for k, v in got.items():
                assert torch.isfinite(v).all(), k
                if k.endswith("pos_embed"):  # (the constructor's too)
                    table = _official_sincos(v.shape[1], grid).to(dt)
                    assert torch.equal(v, table) and torch.equal(want[k], table), k
                elif k.endswith("bias"):
                    assert not v.any(), k
                elif k.split(".")[-2:-1] and "norm" in k.split(".")[-2]:
                    assert torch.equal(v, torch.ones_like(v)), k
                else:
                    pooled.append(v.double().flatten())
            w = torch.cat(pooled)
            assert w.abs().max() < 0.2 and (w != 0).float().mean() > 0.99
            if w.numel() >= 200:
                assert 0.012 < w.std() < 0.028, w.std()


# ------------------------------------------------------------------------------------------------ FLOPs
_MM = ("mm", "addmm", "bmm", "baddbmm", "convolution")


def _matmul_flops(counter) -> tuple:
    """(linear FLOPs, attention FLOPs) of a FlopCounterMode: mm/addmm (Linear, patch GEMM) and bmm (the attention's
    products, :func:`_bmm_attention`; the models' Linears never batch-multiply)."""
    counts = {str(k).split(".")[-1]: v for k, v in counter.get_flop_counts().get("Global", {}).items()}
    unknown = set(counts) - set(_MM)
    assert not unknown, f"matmul-like ops the test does not sort: {unknown}"
    return counts.get("mm", 0) + counts.get("addmm", 0) + counts.get("convolution", 0), \
        counts.get("bmm", 0) + counts.get("baddbmm", 0)


@st.composite
def flop_configs(draw):
    cfg = draw(model_configs(dtypes=(F64,)))
    # a patch of C·p² pixels a multiple of 8: the patch GEMM pads K to a multiple of 8 (its padding zeros are not
    # FLOPs of the convolution the count describes); grid 1-4
    patch, chans = draw(st.sampled_from([(4, 1), (4, 2), (4, 3), (8, 1), (8, 3), (2, 2), (6, 2)]))
    grid = draw(st.integers(1, 4 if patch <= 6 else 2))
    cfg["enc"].update(img_size=grid * patch, patch_size=patch, in_chans=chans)
    cfg["pred"].update(num_patches=grid * grid, mlp_ratio=4.0)  # (the count takes the predictor's official 4)
    return cfg


def _bmm_attention(q, k, v, *, scale=None, cu_seqlens=None):
    """softmax(q·kᵀ·scale)·v with one ``torch.bmm`` per product, whatever the sizes (einsum, as the reference
    attention computes it, turns a product with a dimension of 1 into an elementwise one the counter skips)."""
    assert cu_seqlens is None
    B, N, H, Dh = q.shape

    def heads(t):
        return t.permute(0, 2, 1, 3).reshape(B * H, t.shape[1], Dh)
    s = torch.bmm(heads(q), heads(k).transpose(1, 2)) * (Dh ** -0.5 if scale is None else scale)
    return torch.bmm(torch.softmax(s, -1), heads(v)).reshape(B, H, N, Dh).permute(0, 2, 1, 3)


@settings(max_examples=50)
@given(cfg=flop_configs(), B=st.integers(1, 3), npred=st.integers(1, 3), data=st.data())
def test_step_flops_are_what_the_step_multiplies(monkeypatch, cfg, B, npred, data):
    """``jepa_step_flops`` per part against FlopCounterMode on the same step (float64, attention through the
    reference backend, its products as bmm): target_forward = the target encoder's Linear + patch FLOPs over all N
    patches (no grad); context_fwd_bwd = the context encoder's forward and backward (the patch embedding's
    backward only its weight gradient); predictor_fwd_bwd = the predictor's forward and backward, its context input
    needing a gradient (the StoP noise projection's backward only its weight gradient); attention = the three
    parts' Q·Kᵀ and P·V, forward and backward; total = their sum. Exact (to the float rounding of the MLP ratio
    hidden / E)."""
    g = torch.Generator().manual_seed(cfg["seed"])
    enc, pred, tgt_enc = _build(cfg, g, target=True)
    e, p = cfg["enc"], cfg["pred"]
    N = p["num_patches"]
    Nc, Nt = data.draw(st.integers(1, N + 1)), data.draw(st.integers(1, N + 1))
    imgs = torch.randn(B, e["in_chans"], e["img_size"], e["img_size"], generator=g, dtype=F64)
    ctx, tgt = _masks(g, B, N, 1, Nc)[0], _masks(g, B, N, npred, Nt)
    from torch.utils.flop_counter import FlopCounterMode
    monkeypatch.setattr(reference, "attention", _bmm_attention)
    with use_attention_backend("reference"):
        with FlopCounterMode(display=False) as c_tgt, torch.no_grad():
            h = reference.target_features(tgt_enc(imgs), tgt)
        with FlopCounterMode(display=False) as c_ctx_fwd:
            z = enc(imgs, [ctx])
        zd = z.detach().requires_grad_()
        with FlopCounterMode(display=False) as c_pred:
            out = pred(zd, [ctx], tgt, generator=torch.Generator().manual_seed(1))
            reference.jepa_loss(out, h).backward()
        with FlopCounterMode(display=False) as c_ctx_bwd:
            z.backward(zd.grad)
    got = {name: _matmul_flops(c) for name, c in (("tgt", c_tgt), ("ctx_fwd", c_ctx_fwd), ("pred", c_pred),
                                                 ("ctx_bwd", c_ctx_bwd))}
    hidden = int(e["embed_dim"] * e["mlp_ratio"])  # the model's MLP width, whose ratio the count takes
    want = flops.jepa_step_flops(embed_dim=e["embed_dim"], depth=e["depth"], mlp_ratio=hidden / e["embed_dim"],
                                 pred_dim=p["predictor_embed_dim"], pred_depth=p["depth"], batch=B, num_patches=N,
                                 patch_size=e["patch_size"], n_ctx=Nc, n_tgt=Nt, npred=npred, in_chans=e["in_chans"],
                                 noise_projection=p["noise_mode"] == "learned")
    approx = dict(rel=1e-12, abs=1e-6)
    assert want["target_forward"] == pytest.approx(got["tgt"][0], **approx)
    assert want["context_fwd_bwd"] == pytest.approx(got["ctx_fwd"][0] + got["ctx_bwd"][0], **approx)
    assert want["predictor_fwd_bwd"] == pytest.approx(got["pred"][0], **approx)
    assert want["attention"] == pytest.approx(sum(a for _, a in got.values()), **approx)
    assert want["total"] == pytest.approx(sum(a + b for a, b in got.values()), **approx)


def _heads_of(t, H):
    return t.permute(0, 2, 1, 3).reshape(t.shape[0] * H, t.shape[1], t.shape[3])


@settings(max_examples=60)
@given(seqs=st.integers(1, 4), seqlen=st.integers(1, 9), H=st.integers(1, 4), Dh=st.integers(1, 8),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), with_lse=st.booleans(),
       seed=st.integers(0, 2 ** 31))
def test_attention_cost_counts_the_products_and_the_tensors_moved(seqs, seqlen, H, Dh, dtype, with_lse, seed):
    """``attention_cost(seqs, seqlen, H·Dh, kind, heads, elt)``: the FLOPs FlopCounterMode counts for the forward's
    Q·Kᵀ and P·V, for a flash backward's five products (Q·Kᵀ recomputed, dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K,
    dK = dSᵀ·Q), and for both; the bytes are the sizes of the tensors each reads and writes (forward: q, k, v
    in, o out; backward: q, k, v, o, dO and the float32 logsumexp ``[seqs, heads, seqlen]`` in, dq, dk, dv out;
    both: the forward also writes the logsumexp), ``heads`` 0 leaving the logsumexp out; another kind is
    refused, naming ``kind``."""
    from torch.utils.flop_counter import FlopCounterMode
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(seqs, seqlen, H, Dh, generator=g).to(dtype) for _ in range(4))
    qh, kh, vh, doh = (_heads_of(t.float(), H) for t in (q, k, v, do))
    with FlopCounterMode(display=False) as c_fwd:
        p = torch.softmax(torch.bmm(qh, kh.transpose(1, 2)) * Dh ** -0.5, -1)
        o = torch.bmm(p, vh).to(dtype)
    with FlopCounterMode(display=False) as c_bwd:  # a flash backward: recompute P, then four products
        p = torch.softmax(torch.bmm(qh, kh.transpose(1, 2)) * Dh ** -0.5, -1)
        dv = torch.bmm(p.transpose(1, 2), doh)
        dp = torch.bmm(doh, vh.transpose(1, 2))
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq, dk = torch.bmm(ds, kh), torch.bmm(ds.transpose(1, 2), qh)
    lse = torch.empty(seqs, H, seqlen, dtype=torch.float32)
    lse_bytes = lse.nbytes if with_lse else 0
    nbytes = lambda *ts: sum(t.nbytes for t in ts)  # noqa: E731
    grads = [t.to(dtype) for t in (dq, dk, dv)]
    fwd = (c_fwd.get_total_flops(), nbytes(q, k, v, o))
    bwd = (c_bwd.get_total_flops(), nbytes(q, k, v, o, do, *grads) + lse_bytes)
    width, heads, elt = H * Dh, H if with_lse else 0, q.element_size()
    assert flops.attention_cost(seqs, seqlen, width, "fwd", heads, elt) == pytest.approx(fwd, rel=1e-12)
    assert flops.attention_cost(seqs, seqlen, width, "bwd", heads, elt) == pytest.approx(bwd, rel=1e-12)
    want = (fwd[0] + bwd[0], fwd[1] + lse_bytes + bwd[1])
    assert flops.attention_cost(seqs, seqlen, width, "fwdbwd", heads, elt) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="^kind: "):
        flops.attention_cost(seqs, seqlen, width, "forward", heads, elt)


# ------------------------------------------------------------------------------------------------ bad arguments
_ENC = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=16, depth=1, num_heads=2, mlp_ratio=4.0)
_PRED = dict(num_patches=16, embed_dim=16, predictor_embed_dim=8, depth=1, num_heads=2, mlp_ratio=4.0,
             noise_mode="learned", noise_std=0.25, input_backend="auto")
_NAN, _INF = float("nan"), float("inf")
# (argument, bad value, the argument the error names)
ENCODER_DEFECTS = [
    ("img_size", v, "img_size") for v in (True, 0, -16, 18, 16.0, "16", None)] + [
    ("patch_size", v, "patch_size") for v in (True, 0, -4, 4.0, None)] + [
    ("patch_size", 3, "img_size")] + [  # 16 px is no multiple of 3: the image size is at fault
    ("in_chans", v, "in_chans") for v in (True, 0, -1, 1.5, "3")] + [
    ("embed_dim", v, "embed_dim") for v in (True, 0, -16, 18, 16.0, "16")] + [
    ("depth", v, "depth") for v in (True, False, -1, 1.0, None)] + [
    ("num_heads", v, "num_heads") for v in (True, 0, -2, 3, 32, 2.0, None)] + [
    ("mlp_ratio", v, "mlp_ratio") for v in (0, -1.0, _INF, _NAN, True, "4")]
PREDICTOR_DEFECTS = [
    ("num_patches", v, "num_patches") for v in (True, 0, -16, 15, 16.0, None)] + [
    ("embed_dim", v, "embed_dim") for v in (True, 0, -8, 8.0)] + [
    ("predictor_embed_dim", v, "predictor_embed_dim") for v in (True, 0, 10, 8.0)] + [
    ("depth", v, "depth") for v in (True, -1, 2.0)] + [
    ("num_heads", v, "num_heads") for v in (True, 0, 3, 16, 2.0)] + [
    ("mlp_ratio", v, "mlp_ratio") for v in (0.0, -4.0, _NAN, True)] + [
    ("noise_mode", v, "noise_mode") for v in ("stop", "", "Learned", None, 1)] + [
    ("noise_std", v, "noise_std") for v in (-0.1, _NAN, _INF, True, "0.25", None)] + [
    ("input_backend", v, "input_backend") for v in ("gpu", "", None)]


@settings(max_examples=150)
@given(which=st.sampled_from(["encoder", "predictor", "vit_encoder", "vit_predictor", "predictor_for"]),
       data=st.data())
def test_bad_constructor_arguments_are_named(which, data):
    """One bad argument drawn per example (a bool or a float as a size, a size < 1, a depth < 0, a head count that
    does not divide the width, a width that is no multiple of 4, an MLP ratio that is not positive and finite, an
    unknown preset, noise mode or input backend, a σ that is negative, NaN, infinite or no number, a patch grid
    that is not the encoder's) raises ValueError or TypeError whose message starts with that argument's name; the
    same call without the defect builds."""
    if which in ("encoder", "predictor"):
        base, defects = (_ENC, ENCODER_DEFECTS) if which == "encoder" else (_PRED, PREDICTOR_DEFECTS)
        arg, bad, named = data.draw(st.sampled_from(defects))
        cls = VisionTransformer if which == "encoder" else VisionTransformerPredictor
        cls(**base)
        with pytest.raises((ValueError, TypeError)) as err:
            cls(**{**base, arg: bad})
    elif which == "vit_encoder":
        arg, bad, named = data.draw(st.sampled_from(
            [("name", v, "model") for v in ("vit_enormous", "vit_x", "", None, 3, ["vit_tiny"])]
            + [("img_size", v, "img_size") for v in (True, 0, 100, 32.0)]
            + [("patch_size", v, "patch_size") for v in (True, 0, 8.0)]
            + [("in_chans", v, "in_chans") for v in (True, 0, 2.5)]))
        kw = dict(name="vit_tiny", img_size=32, patch_size=8, in_chans=3)
        with pytest.raises((ValueError, TypeError)) as err:
            vit_encoder(**{**kw, arg: bad})
    elif which == "vit_predictor":
        arg, bad, named = data.draw(st.sampled_from(
            [d for d in PREDICTOR_DEFECTS if d[0] not in ("mlp_ratio",)]))
        kw = {k: v for k, v in _PRED.items() if k != "mlp_ratio"}
        vit_predictor(**kw)
        with pytest.raises((ValueError, TypeError)) as err:
            vit_predictor(**{**kw, arg: bad})
    else:
        enc = VisionTransformer(**_ENC)  # a 4 x 4 grid
        arg, bad, named = data.draw(st.sampled_from(
            [("img_size", v, "img_size") for v in (32, 8, True, 0, 18)]
            + [("patch_size", v, "patch_size") for v in (True, 0, 4.0)]
            + [("encoder", v, "encoder") for v in (None, "vit_tiny", torch.nn.Linear(2, 2))]
            + [("noise_mode", "stop", "noise_mode"), ("predictor_embed_dim", 10, "predictor_embed_dim"),
               ("depth", -1, "depth")]))
        kw = dict(encoder=enc, img_size=16, patch_size=4, predictor_embed_dim=8, depth=1)
        predictor_for(kw.pop("encoder"), **kw)
        kw = {**kw, "encoder": enc, arg: bad}
        with pytest.raises((ValueError, TypeError)) as err:
            predictor_for(kw.pop("encoder"), **kw)
    assert str(err.value).startswith(named + ":"), (arg, bad, str(err.value))


# ------------------------------------------------------------------------------------------------ defects found
class _Scaled(torch.nn.Module):
    """A weight parametrization (``torch.nn.utils.parametrize``): the weight the module computes with is
    ``scale ·`` the stored one."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, w):
        return self.scale * w


# The defects found (fixed; example-based, not drawn: a failing hypothesis test shrinks and writes its example out
# on every run)
_DEFECT_CFG = dict(enc=dict(img_size=16, patch_size=4, in_chans=3, embed_dim=16, depth=1, num_heads=2, mlp_ratio=4.0,
                            qkv_bias=True),
                   pred=dict(num_patches=16, embed_dim=16, predictor_embed_dim=8, depth=1, num_heads=2, mlp_ratio=4.0,
                             qkv_bias=True, noise_mode="learned", noise_std=0.25),
                   dtype=torch.float32, seed=5)


@pytest.mark.parametrize("mode", ["learned", "none"])
def test_official_checkpoint_of_a_parametrized_predictor_embed_holds_its_weight(tmp_path, mode):
    """The predictor takes a parametrization of ``predictor_embed.weight`` (README, "Use in your own model": "a
    parametrization of the weight works"; the predictor reads ``.weight``). Written by save_official_checkpoint
    ("so code built on the official checkpoints reads them unchanged"), the file holds the official layout, with
    the weight the model computes with, and loads back into a predictor computing the same outputs."""
    from torch.nn.utils import parametrize
    cfg = copy.deepcopy(_DEFECT_CFG)
    cfg["pred"]["noise_mode"] = mode
    g = torch.Generator().manual_seed(cfg["seed"])
    enc, pred = _build(cfg, g)
    parametrize.register_parametrization(pred.predictor_embed, "weight", _Scaled(2.0))
    path = save_official_checkpoint(tmp_path / "p.pth.tar", enc, pred)
    ck = torch.load(path, weights_only=True)
    assert {k: tuple(v.shape) for k, v in ck["predictor"].items()} == _layouts(cfg)[1]
    assert torch.equal(ck["predictor"]["module.predictor_embed.weight"], pred.predictor_embed.weight.detach())
    m = load_official_checkpoint(path, num_heads=2, noise_mode=mode, noise_std=0.25)
    x, ctx, tgt = torch.randn(2, 3, 16, generator=g), _masks(g, 2, 16, 1, 3)[0], _masks(g, 2, 16, 1, 2)
    with torch.no_grad():
        assert torch.equal(m.predictor(x, ctx, tgt, generator=torch.Generator().manual_seed(0)),
                           pred(x, ctx, tgt, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("which, width, ratio", [("encoder", 16, 0.05), ("predictor", 8, 0.1), ("encoder", 48, 1e-3)])
def test_an_mlp_ratio_that_leaves_no_hidden_unit_is_refused(which, width, ratio):
    """mlp_ratio 0 is refused as a degenerate model (``mlp_ratio: expected a positive finite number``, a review
    finding of test_models); a positive ratio r with ``int(width · r) == 0`` builds that same model (``fc1`` of
    ``[0, width]``, every block's MLP its ``fc2`` bias alone), so it is refused the same way, naming mlp_ratio."""
    assert int(width * ratio) == 0
    with pytest.raises(ValueError, match="^mlp_ratio: "):
        if which == "encoder":
            VisionTransformer(img_size=8, patch_size=4, embed_dim=width, depth=1, num_heads=2, mlp_ratio=ratio)
        else:
            VisionTransformerPredictor(num_patches=4, embed_dim=16, predictor_embed_dim=width, depth=1, num_heads=2,
                                       mlp_ratio=ratio)
