"""``compile_mode: reduce-overhead``: every compiled block, forward and backward, replayed from Inductor's CUDA-graph
trees. On the CPU: what the config and the Trainer refuse, the warm-up a timing needs, a new tree generation per
micro-batch and the stable gradient buffers of gradient accumulation. On a GPU: replayed steps train like the default
mode's, and no graph ran without CUDA graphs."""
import pytest
import torch

from stop_kernels.training import distributed as D
from stop_kernels.training.config import ConfigError, TrainConfig, parse_config
from stop_kernels.training.loop import Trainer

from _train_helpers import TINY, cuda_step_losses


def tiny(tmp_path, **over):
    return TrainConfig(**dict(TINY, out=str(tmp_path), **over))


def test_reduce_overhead_is_refused_where_it_cannot_apply(tmp_path, cpu_train, monkeypatch):
    """What cannot share a step with the CUDA-graph trees is refused by key, with the way out: the C++ host code
    (the ViT-H recipe's; a replay runs no host code), per-block activation checkpointing, the target encoder's own
    CUDA graph or side stream, and FSDP2 (parameters gathered into new memory every step)."""
    ro = ["--compile", "--compile-mode", "reduce-overhead"]
    for flags, key in ((["--cpp-wrapper"], "cpp_wrapper"), (["--ac", "block"], "ac"),
                       (["--cuda-graph-target"], "cuda_graph_target"), (["--overlap-target"], "overlap_target")):
        with pytest.raises(ConfigError, match=rf"^{key}: does not combine with compile_mode 'reduce-overhead'"):
            parse_config(["--model", "vit_tiny"] + ro + flags)
    with pytest.raises(ConfigError, match=r"^cpp_wrapper: does not combine .*--cpp-wrapper false"):
        parse_config(["--model", "vit_h", "--compile-mode", "reduce-overhead"])
    assert not parse_config(["--model", "vit_h", "--compile-mode", "reduce-overhead", "--cpp-wrapper", "false"]).cpp_wrapper
    # each alone is fine; and the modes without CUDA graphs take the C++ host code as before
    assert parse_config(["--model", "vit_h", "--compile-mode", "max-autotune-no-cudagraphs"]).cpp_wrapper
    monkeypatch.setattr(D, "build_mesh", lambda sharding, info: object())  # as with FSDP2 on several ranks
    cfg = tiny(tmp_path, compile=True, compile_mode="reduce-overhead")
    with pytest.raises(ConfigError, match=r"^compile_mode: 'reduce-overhead' replays graphs .* got sharding"):
        Trainer(cfg, D.init_distributed(cfg), None)


def test_reduce_overhead_warms_up_each_mask_batch_three_times():
    """A timing under CUDA-graph trees starts after each mask batch's lengths were run, recorded and replayed once,
    so no timed step records; the other modes need one pass (train.py --benchmark and profile_step.py share this)."""
    from stop_kernels.training.loop import CUDA_GRAPH_TREE_PASSES, warmup_steps
    assert CUDA_GRAPH_TREE_PASSES == 3
    ro = TrainConfig(compile=True, compile_mode="reduce-overhead")
    assert warmup_steps(ro, 1, 6) == 18 and warmup_steps(ro, 30, 6) == 30
    assert warmup_steps(TrainConfig(compile=True), 1, 6) == 6 and warmup_steps(TrainConfig(), 8, 6) == 8
    # the mode without --compile does not reach a config (refused above), so it never asks for the passes
    assert warmup_steps(TrainConfig(compile=False, compile_mode="reduce-overhead"), 1, 6) == 6


def test_reduce_overhead_steps_mark_each_micro_batch_and_keep_stable_grads(tmp_path, cpu_train, monkeypatch, capsys):
    """Each micro-batch starts a new generation of the tree (``cudagraph_mark_step_begin``); with several
    micro-batches the gradients accumulate into .grad buffers of their own, made once from the first backward's (a
    replayed backward's outputs are overwritten by the next replay) and zeroed, not freed, after each step; a
    parameter without a gradient (the predictor's mask token, unused by StoP) keeps none, so AdamW skips it as
    before. The steps give the losses of eager blocks (on a CPU Inductor runs the graphs without CUDA graphs and
    counts each as skipped)."""
    from stop_kernels.training.loop import synthetic_batches
    from stop_kernels.training.parallelize import cudagraph_skips
    marks = []
    real_mark = torch.compiler.cudagraph_mark_step_begin
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1) or real_mark())
    losses = {}
    for run in ("eager", "reduce-overhead"):
        over = dict(compile=True, compile_mode="reduce-overhead") if run != "eager" else {}
        cfg = TrainConfig(**dict(TINY, out=str(tmp_path / run), seed=3, grad_accum=2, **over))
        tr = Trainer(cfg, D.init_distributed(cfg), None)
        assert tr.cuda_graph_trees is (run != "eager") and tr.stable_grads is (run != "eager")
        said = "compile_mode: 'reduce-overhead' has no CUDA graphs on cpu" in capsys.readouterr().out
        assert said is (run != "eager")  # the CPU runs the graphs as compiled, and says so
        params = [p for m in (tr.models.encoder, tr.models.predictor) for p in m.parameters() if p.requires_grad]
        batches = synthetic_batches(cfg, 4, cfg.batch_size // 2, torch.device("cpu"), seed=4)
        torch.manual_seed(7)
        sched = (cfg.lr, cfg.weight_decay, cfg.ema_start)
        losses[run], ptrs = [], []
        for i in range(3):
            losses[run].append(float(tr.step_micro(batches[2 * (i % 2):2 * (i % 2) + 2], sched)[0]))
            ptrs.append([p.grad.data_ptr() if p.grad is not None else None for p in params])
        if tr.stable_grads:
            assert ptrs[0] == ptrs[1] == ptrs[2]  # the same buffers, zeroed after every step
            assert all(p.grad is None or not p.grad.any() for p in params)
            assert tr.models.predictor.mask_token.grad is None  # no gradient: none made up
            assert sum(p.grad is not None for p in params) == len(params) - 1
            assert cudagraph_skips() > 0  # the CPU: every graph ran without CUDA graphs, and says so
        else:
            assert all(p.grad is None for p in params)  # freed after each step
    assert len(marks) == 3 * 2  # one generation per micro-batch, in the reduce-overhead run only
    for a, b in zip(losses["reduce-overhead"], losses["eager"]):
        assert abs(a - b) <= 1e-5 * abs(b), losses


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph trees need a CUDA GPU")
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_reduce_overhead_replays_train_like_default_compiled_blocks(tmp_path, grad_accum):
    """Trainer steps with every compiled block replayed from CUDA graphs give the losses of the default mode over
    three passes of three mask batches (warm-up, recording, replay of each length): a replay reading a stale input,
    or gradients overwritten between micro-batches, would show as another loss. The tree recorded graphs (the
    mode took effect) and no graph ran without CUDA graphs."""
    from torch._dynamo.utils import counters
    from stop_kernels.training.parallelize import cudagraph_recordings, cudagraph_skips
    base, _ = cuda_step_losses(tmp_path / "default", steps=9, compile=True, grad_accum=grad_accum)
    before = cudagraph_recordings(torch.device("cuda"))  # (the tree is the process's: an earlier case's stay)
    counters.clear()
    graphed, tr = cuda_step_losses(tmp_path / "graphs", steps=9, compile=True, compile_mode="reduce-overhead",
                                    grad_accum=grad_accum)
    assert tr.cuda_graph_trees and cudagraph_skips() == 0
    # encoder, predictor and target encoder blocks, forward (and backward for the trained ones), per length
    assert cudagraph_recordings(torch.device("cuda")) >= before + 3 * 2, (before, cudagraph_recordings(torch.device("cuda")))
    for a, b in zip(graphed, base):
        assert abs(a - b) <= 1e-3 * abs(b), (graphed, base)


def test_cudagraph_recordings_counts_every_node_of_the_tree(monkeypatch):
    """The positive check that the trees took effect counts the recorded graphs of Inductor's tree on the device,
    roots and their descendants (a fake tree here: a CPU has none), 0 off CUDA or before any recording, and None
    where the tree's internals are not the ones it reads."""
    import types

    from torch._inductor import cudagraph_trees
    from stop_kernels.training.parallelize import cudagraph_recordings

    def node(*children):
        return types.SimpleNamespace(children={"f": list(children)})
    tree = types.SimpleNamespace(roots={"a": [node(node(), node(node()))], "b": [node()]})
    assert cudagraph_recordings(torch.device("cpu")) == 0
    for manager, want in ((tree, 5), (None, 0), (types.SimpleNamespace(roots=None), 0), (object(), None)):
        monkeypatch.setattr(cudagraph_trees, "get_manager", lambda index, create_if_none_exists=True, m=manager: m)
        assert cudagraph_recordings(torch.device("cuda", 0)) == want, manager
