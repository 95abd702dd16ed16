"""The CUDA paths, where a GPU is (skipped elsewhere; CI has none): every objective trains in bf16 on the GPU, a
run resumes there, every solver gives on the GPU what it gives on the CPU and counts the same NFE, stochastic
samplers are reproducible per CUDA generator seed, rollouts and sampling run on the device, and torchrun starts
the NCCL path."""
import json
import math

import pytest
import torch

from models.analytic import GaussianMixtureDenoiser
from data.mixtures import gaussian_mixture_params
from runs import make_pairs, sample
from runs.checkpoint import load_checkpoint
from runs.train import make_config, parse_args, train
from solvers import SOLVERS, CountingDenoiser, options_for_nfe, sigmas_for_nfe
from solvers.optimise import _takes_generator
from tests.test_distill_runs import IMAGE, OBJECTIVES, config_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ON_GPU = ["train.device=cuda", "train.amp=bf16"]
TEACHER = (["--backbone", "unet", "--objective", "dsm", "--data", "gmm"],
           [o for o in IMAGE if not o.startswith("teacher.")] + ["backbone.attn_resolutions=[4]"])  # SDPA at 4x4


def on_gpu(overrides):
    return [o for o in overrides if o != "train.device=cpu"] + ON_GPU


def finite(state):
    return all(torch.isfinite(t).all() for role in state["networks"].values() for t in role.values())


@pytest.mark.parametrize("name", ["dsm", *OBJECTIVES])
def test_every_objective_trains_on_the_gpu_in_bf16(tmp_path, name):
    flags, overrides = TEACHER if name == "dsm" else OBJECTIVES[name][:2]
    flags = flags if "--data" in flags else flags + ["--data", "gmm"]
    train(config_of(flags, on_gpu(overrides) + ["train.steps=3"]), tmp_path / name)
    state = load_checkpoint(tmp_path / name)
    assert state["step"] == 3 and finite(state)
    if name != "dsm":
        report = json.loads((tmp_path / name / "quality.json").read_text())
        assert math.isfinite(report["map_rmse"] if "map_rmse" in report else report["swd"])


def test_resume_on_the_gpu_continues_the_run(tmp_path):
    """Not bit-exact here (cuDNN may pick non-deterministic kernels), so: the same step count and weights close to
    the straight run's."""
    flags, overrides = TEACHER
    overrides = on_gpu(overrides) + ["train.amp=none"]
    train(config_of(flags, overrides + ["train.steps=4"]), tmp_path / "straight")
    train(config_of(flags, overrides + ["train.steps=2"]), tmp_path / "stopped")
    train(make_config(parse_args(["--resume", str(tmp_path / "stopped"), "train.steps=4"]))[0], tmp_path / "stopped",
          resume=True)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "stopped")
    assert a["step"] == b["step"] == 4
    for name, tensor in a["networks"]["denoiser"].items():
        torch.testing.assert_close(tensor, b["networks"]["denoiser"][name], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_every_solver_gives_the_cpu_result_on_the_gpu(name):
    solver = SOLVERS[name]
    cpu = GaussianMixtureDenoiser(**gaussian_mixture_params(8, 4, seed=0))
    gpu = GaussianMixtureDenoiser(**gaussian_mixture_params(8, 4, seed=0)).cuda()
    x = 80.0 * torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = sigmas_for_nfe(solver, 10)
    options = options_for_nfe(solver, 10)
    if _takes_generator(solver):
        runs = [solver(gpu, x.cuda(), sigmas.cuda(), generator=torch.Generator("cuda").manual_seed(seed), **options)
                for seed in (0, 0, 1)]
        assert torch.equal(runs[0], runs[1]) and torch.isfinite(runs[2]).all()
        return
    counted = CountingDenoiser(gpu)
    on_gpu_x0 = solver(counted, x.cuda(), sigmas.cuda(), **options)
    assert counted.nfe == 10
    torch.testing.assert_close(on_gpu_x0.cpu(), solver(cpu, x, sigmas, **options), rtol=1e-9, atol=1e-9)


def test_rollouts_and_sampling_on_the_gpu(tmp_path):
    flags, overrides = TEACHER
    train(config_of(flags, on_gpu(overrides) + ["train.steps=2"]), tmp_path / "teacher")
    make_pairs.main(["--teacher", str(tmp_path / "teacher"), "--n", "32", "--nfe", "7", "--save-sigmas", "2",
                     "--out", str(tmp_path / "pairs"), "--device", "cuda"])
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert manifest["n"] == 32 and len(manifest["sigmas"]) == 2
    sample.main([str(tmp_path / "teacher"), "--solver", "dpmpp_3m", "--nfe", "10", "--n", "8",
                 "--out", str(tmp_path / "s.npz"), "--device", "cuda"])
    assert (tmp_path / "s.npz").is_file()


def test_torchrun_on_one_gpu_uses_nccl(tmp_path, run_cli):
    flags, overrides = TEACHER
    result = run_cli("torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "runs.train", *flags,
                     *on_gpu(overrides), "train.steps=2", "--out", tmp_path / "ddp", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_checkpoint(tmp_path / "ddp")["step"] == 2


@pytest.mark.parametrize("name", ["ct", "ict"])
def test_teacher_free_consistency_training_on_the_gpu(tmp_path, name):
    overrides = [o for o in on_gpu(IMAGE) if not o.startswith("teacher.")] + ["backbone.dropout=0.1", "train.steps=3"]
    train(config_of(["--backbone", "unet", "--objective", name, "--data", "gmm"], overrides), tmp_path / name)
    state = load_checkpoint(tmp_path / name)
    assert state["step"] == 3 and finite(state)


def test_consistency_target_replays_the_dropout_mask_on_the_gpu():
    """x_lo = x_hi at one level and mu = 0: the target pass must draw the online pass's CUDA dropout mask."""
    from models.mlp import MLP
    from objectives.cd import CD
    cd = CD(MLP(dim=2, hidden=32, num_blocks=2, dropout=0.5),
            teacher=GaussianMixtureDenoiser(**gaussian_mixture_params(2, 4, seed=0)), num_levels=2)
    torch.nn.init.normal_(cd.networks["student"].backbone.out.weight)
    cd.to("cuda")
    cd.networks["student"].cuda()
    cd.grid = lambda n, device: torch.tensor([3.0, 3.0], device=device)
    cd.lower_point = lambda x0, z, x_hi, *rest: x_hi
    loss, _ = cd.loss("student", (torch.randn(16, 2, device="cuda"), torch.zeros(16, dtype=torch.long, device="cuda")),
                      0)
    assert loss.item() == 0.0
