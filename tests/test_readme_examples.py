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


def test_every_dotted_name_in_the_readme_resolves_after_a_plain_import():
    """Each ``stop_kernels.a.b`` the README names (``stop_kernels.data.MultiBlockMaskCollator``,
    ``stop_kernels.models.flops.jepa_step_floors_ms``, …) is reachable after ``import stop_kernels`` alone, in a
    fresh interpreter (in this one the tests have imported the submodules already). Names of modules (run with
    ``python -m`` or imported by path) only need to exist; ``stop_kernels._C``, the optional CUDA extension, is
    left out."""
    import subprocess
    import sys
    text = (REPO / "README.md").read_text()
    names = sorted(set(re.findall(r"\bstop_kernels(?:\.[A-Za-z_]\w*)+", text)) - {"stop_kernels._C"})
    assert "stop_kernels.data.MultiBlockMaskCollator" in names and len(names) > 10, names
    probe = ("import functools, importlib.util, stop_kernels\n"
             "def is_module(name):\n"
             "    try:\n"
             "        return importlib.util.find_spec(name) is not None\n"
             "    except ImportError:\n"
             "        return False\n"
             "missing = []\n"
             f"for name in {names!r}:\n"
             "    try:\n"
             "        functools.reduce(getattr, name.split('.')[1:], stop_kernels)\n"
             "    except AttributeError:\n"
             "        if not is_module(name):\n"
             "            missing.append(name)\n"
             "print(missing)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"README names not reachable from `import stop_kernels`: {out.stdout}"


def test_public_api_is_listed_and_documented():
    """Every name of ``stop_kernels.__all__`` is in the package docstring's "Public API" list and has a docstring;
    each op's states its math and the shape it returns."""
    listing = stop_kernels.__doc__.split("Public API:", 1)[1]
    listed = set(re.findall(r"[A-Za-z_]\w*", listing))
    assert not set(stop_kernels.__all__) - listed, set(stop_kernels.__all__) - listed
    for name in stop_kernels.__all__:
        if name != "__version__":
            assert (getattr(stop_kernels, name).__doc__ or "").strip(), name
    math = {"stop_embed": "n·Wᵀ", "assemble_predictor_input": "[npred·B, Nc+Nt, D]", "attention": "softmax(",
            "attention_qkv": ":func:`attention`", "dispatch_attention": "softmax(", "dispatch_attention_qkv": "softmax("}
    shape = {"stop_embed": "[..., M, D]", "assemble_predictor_input": "[npred·B, Nc+Nt, D]",
             "attention": "[B, N, H, Dh]", "attention_qkv": "returns ``[B, N, H, Dh]``",
             "dispatch_attention": "→ ``[B, N, H, Dh]``", "dispatch_attention_qkv": "as ``[B, N, H, Dh]``"}
    for name in math:
        doc = getattr(stop_kernels, name).__doc__
        assert math[name] in doc and shape[name] in doc, name


def test_every_exported_function_and_class_has_a_docstring():
    """Beyond ``stop_kernels.__all__``: what the op modules and the model registry export is documented too
    (``help()`` and the docs point users at these modules)."""
    import importlib
    import inspect
    missing = []
    for name in ("stop_kernels.ops.stop_embed", "stop_kernels.ops.predictor_input", "stop_kernels.ops.attention",
                 "stop_kernels.models", "stop_kernels.reference", "stop_kernels.data", "stop_kernels.eval"):
        mod = importlib.import_module(name)
        assert mod.__doc__ and mod.__all__, name
        for attr in mod.__all__:
            obj = getattr(mod, attr)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not (obj.__doc__ or "").strip():
                missing.append(f"{name}.{attr}")
    assert not missing, missing


class _Parsed(Exception):
    """Raised by the stubs below once a command's arguments have been parsed and checked."""


def doc_commands():
    """Every shell command of the README's and docs' ```bash blocks, continuation lines joined, comments dropped."""
    import shlex
    cmds = []
    for doc in ("README.md", "docs/training.md", "docs/evaluation.md"):
        for block in re.findall(r"```bash\n(.*?)```", (REPO / doc).read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip()
                if line and not line.startswith("#"):
                    cmds.append((doc, shlex.split(line)))
    return cmds


def test_every_documented_command_parses_with_its_programs_own_parser(monkeypatch):
    """The commands shown in README.md, docs/training.md and docs/evaluation.md name only flags, choices and
    values their program accepts: each goes through that program's parser (train.py's whole config
    validation; the benchmark scripts' variant specs) with the work itself stubbed out. A renamed or removed
    flag fails here instead of in a user's shell."""
    import argparse

    from _bench_scripts import import_bench_script
    from stop_kernels import plots
    from stop_kernels.eval import linear_probe
    from stop_kernels.training import checkpoint
    from stop_kernels.training.config import parse_config
    profile_step = import_bench_script(monkeypatch, "profile_step")
    e2e_step = import_bench_script(monkeypatch, "e2e_step")

    def stub(*a, **k):
        raise _Parsed

    def variants_stub(args, json_name=None):  # what run_variants checks before it runs anything
        for spec in args.variants.split(","):
            v = profile_step.parse_variant(spec)
            parse_config(profile_step.variant_argv(v, args.model, args.batch_size, "/nonexistent")
                         + args.extra.split())
        raise _Parsed

    monkeypatch.setattr(linear_probe, "run_probe", stub)
    monkeypatch.setattr(checkpoint, "to_official", stub)
    monkeypatch.setattr(profile_step, "run_variants", variants_stub)
    # argparse takes a unique prefix of a flag (--num-worker for --num-workers); the docs spell flags in full
    monkeypatch.setattr(argparse.ArgumentParser, "_get_option_tuples", lambda self, option_string: [])
    monkeypatch.chdir(REPO)  # --config configs/...
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    mains = {"train.py": parse_config, "stop_kernels.eval.linear_probe": linear_probe.main,
             "stop_kernels.training.checkpoint": checkpoint.main,
             "stop_kernels.plots": lambda argv: plots.build_parser().parse_args(argv),
             "benchmarks/profile_step.py": profile_step.main, "benchmarks/e2e_step.py": e2e_step.main}
    seen = set()
    for doc, argv in doc_commands():
        if "train.py" in argv:  # python train.py … or torchrun … train.py …
            prog, args = "train.py", argv[argv.index("train.py") + 1:]
        elif argv[:2] == ["python", "-m"]:
            prog, args = argv[2], argv[3:]
        else:
            prog, args = (argv[1], argv[2:]) if argv[0] == "python" and len(argv) > 1 else (None, None)
        if prog not in mains:
            continue  # pip, pytest, bash, python -c
        try:
            mains[prog](args)
        except _Parsed:
            pass
        except SystemExit as e:  # argparse's verdict on a bad flag or choice
            raise AssertionError(f"{doc}: {' '.join(argv)} exits {e.code}") from None
        seen.add(prog)
    assert seen == set(mains), seen  # the block parser found every program's commands
