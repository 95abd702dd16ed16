"""Class-conditional runs through every training objective (issue: DiT, guidance and conditional distillation, item
4): with train.conditional=true on a labelled mixture, each objective trains, the labels reach its trainable networks
(their label embeddings change in training) and its sampler takes class labels."""
import pytest
import torch

from objectives import OBJECTIVES
from runs.train import make_config, parse_args, train

VECTOR = ["--data", "gmm", "data.n=256", "backbone.hidden=16", "backbone.num_blocks=1"]
IMAGE = ["--data", "gmm", "data.dim=64", "data.image_shape=[1,8,8]", "data.n=256", "backbone.model_channels=8",
         "backbone.channel_mult=[1,2]", "backbone.attn_resolutions=[]"]
EXTRA = {"kd": ["objective.n=64"], "dmd": ["objective.n=64"], "reflow": ["objective.rollout_n=64"],
         "dsno": ["objective.n=64"], "progressive": ["objective.start_steps=4", "objective.steps_per_stage=2",
                                                     "objective.final_stages_factor=1"]}
STAGED = {"guidance_progressive"}  # needs a stage-one guidance_distill run as its teacher (tested in its own file)


@pytest.mark.parametrize("name", [n for n in OBJECTIVES if n not in STAGED])
def test_every_objective_trains_class_conditional(tmp_path, name):
    backbone, data = ("fno", IMAGE) if name == "dsno" else ("mlp", VECTOR)
    config = make_config(parse_args(["--objective", name, "--backbone", backbone, *data, "train.conditional=true",
                                     "train.steps=3", "train.batch_size=16", "train.sample_every=0",
                                     "train.warmup_steps=0", *EXTRA.get(name, [])]))[0]
    torch.manual_seed(0)
    objective, _ = train(config, tmp_path / name, dataset=None)
    assert config["backbone"]["label_dim"] > 0
    assert any("label" in k for net in objective.networks.values() for k, _ in net.named_parameters()), \
        f"{name}: no role has a label embedding"
    z = torch.randn(4, *((1, 8, 8) if name == "dsno" else (2,)))
    nfe = objective.eval_nfe or 1
    with torch.no_grad():
        a = objective.generate(z, nfe, {"class_labels": torch.zeros(4, dtype=torch.long)})
        b = objective.generate(z, nfe, {"class_labels": torch.ones(4, dtype=torch.long)})
    assert torch.isfinite(a).all() and not torch.allclose(a, b), f"{name}: the class label does not reach samples"


def test_class_ids_out_of_range_are_a_one_line_error():
    from models.labels import label_rows
    with pytest.raises(ValueError, match=r"class ids must lie in 0..9; got \[-1, 12\]"):
        label_rows(torch.tensor([12, -1]), 2, 10, "cpu")
