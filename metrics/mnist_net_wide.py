"""A stronger MNIST feature network for MNIST-FID: a wider, batch-normalised CNN trained with random affine
augmentation, whose FID features read several depths at once.

    python -m metrics.mnist_net_wide --out PATH       # train (about 2 minutes on one CPU thread) and save

Architecture (`WideMnistNet`, 437 k parameters): three stages of 3x3 convolutions with batch norm and ReLU (widths
32, 64, 128; two convolutions in the first two stages, one in the last), 2x2 max pooling after each, then fc(256) ->
ReLU -> dropout -> fc(10). The FID features (`features`, 480-d) are the concatenation of

    the global average of each stage's output (32 + 64 + 128 = 224 numbers: stroke statistics, which a classifier's
    last layer learns to ignore: noise, grain, blur, thickness), and
    the fc(256) layer before its ReLU (the class-level "what digit, in what style"),

each stage average scaled by a fixed factor (`block_scales`, stored with the weights) that gives it the fc block's
total variance (trace of the covariance) on the training digits, so that no block outweighs the others merely by the
scale of its units.

Why: runs/bench_metric.py (`python -m runs.bench metric`, bench/metric_mnist.md) scores degraded real digits and
samples of known-better and known-worse models with this net and with metrics/mnist_net.py's. Both rise monotonically
with noise, blur, dropped classes and duplicates; this one separates the model pairs by more seed-standard-deviations
(teacher Heun-35 vs Heun-9: z 127 vs 15; vs a kd student 56 vs 34; vs a 30-minute sid student 11.7 vs 9.0) and still
separates them at n = 1,000 and 500 where the small net does not. Its fc layer alone is weaker than the small net's
(bench/metric_mnist_ablation.md): the gain is the stage averages. They make it very sensitive to texture (noise of 5
grey levels: 6x the real floor).

The shipped metrics/mnist_feature_net_wide.pt was made by
`python -m metrics.mnist_net_wide --out metrics/mnist_feature_net_wide.pt` (seed 0, 8 epochs, 1 thread, torch 2.14.1,
x86_64), held-out accuracy 0.990 on 1,000 seeded-random digits of the 8,000
(trained on the other 7,000), meta["weights_sha256"] f848a282...: a retrain on the same kind of machine reproduces it
bit for bit (other CPUs, thread counts or torch versions give other weights and other FIDs, as for the small net).

`head` takes the whole feature vector and classifies from its last 256 numbers (the fc block, unscaled) after a ReLU,
exactly as `forward` does, so metrics.mnist_metrics's `net.head(relu(features))` gives this net's predictions.

The checkpoint is {"state_dict", "meta"} (meta["arch"] = "wide"), written atomically and read with
weights_only=True, like metrics/mnist_net.py's. Training is seeded (init, augmentation, batch order, dropout) and
holds out `heldout` seeded-random digits for meta["heldout_accuracy"].
"""
import argparse
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from metrics.mnist_net import _predict, cache_dir, checkpoint_or_trained, training_split

CHECKPOINT_NAME = "mnist_feature_net_wide.pt"
SHIPPED = Path(__file__).with_name(CHECKPOINT_NAME)
ARCH = "wide"


def _block(c_in, c_out):
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class SliceHead(nn.Module):
    """The classifier on the FID feature vector: ReLU of its last `in_features` numbers (the caller may already have
    applied a ReLU to the whole vector; the pooled blocks are >= 0 anyway) -> linear -> logits."""

    def __init__(self, in_features, out_features=10):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, features):
        return self.linear(F.relu(features[:, -self.in_features:]))


class WideMnistNet(nn.Module):
    """conv(32) conv(32) pool conv(64) conv(64) pool conv(128) pool -> fc(fc_dim) -> fc(10), batch norm throughout;
    FID features: per-stage global averages and the fc layer before its ReLU, the averages scaled to the fc layer's
    total variance (`block_scales`, fitted by `fit_block_scales`)."""

    def __init__(self, widths=(32, 64, 128), fc_dim=256, dropout=0.3, pooled=True):
        super().__init__()
        w1, w2, w3 = widths
        self.stages = nn.ModuleList([
            nn.Sequential(*_block(1, w1), *_block(w1, w1), nn.MaxPool2d(2)),        # 14 x 14
            nn.Sequential(*_block(w1, w2), *_block(w2, w2), nn.MaxPool2d(2)),       # 7 x 7
            nn.Sequential(*_block(w2, w3), nn.MaxPool2d(2)),                        # 3 x 3
        ])
        self.fc = nn.Linear(w3 * 3 * 3, fc_dim)
        self.head = SliceHead(fc_dim)
        self.dropout, self.pooled, self.widths = dropout, pooled, tuple(widths)
        self.register_buffer("block_scales", torch.ones(4 if pooled else 1))

    @property
    def feature_dim(self):
        return (sum(self.widths) if self.pooled else 0) + self.fc.out_features

    def blocks(self, x):
        """The unscaled feature blocks: [stage averages (if pooled)..., fc pre-activation]."""
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x.mean((2, 3)))
        fc = self.fc(x.flatten(1))
        return (out if self.pooled else []) + [fc]

    def features(self, x):
        """FID features [B, feature_dim] of x in [-1, 1] [B, 1, 28, 28]: the scaled blocks, concatenated."""
        return torch.cat([b * s for b, s in zip(self.blocks(x), self.block_scales)], 1)

    def forward(self, x):
        fc = self.blocks(x)[-1]
        return self.head.linear(F.dropout(F.relu(fc), self.dropout, self.training))


def random_affine(x, generator, degrees=10.0, scale=(0.9, 1.1), shift=2.0 / 28):
    """Each image of x [B, 1, 28, 28] in [-1, 1] rotated by up to `degrees`, scaled within `scale` and translated by up
    to `shift` of the image width (bilinear, background -1), with draws from `generator`."""
    b = len(x)
    angle = (torch.rand(b, generator=generator) * 2 - 1) * degrees * np.pi / 180
    factor = scale[0] + torch.rand(b, generator=generator) * (scale[1] - scale[0])
    offset = (torch.rand(b, 2, generator=generator) * 2 - 1) * shift * 2  # affine_grid's units: half-widths
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


@torch.no_grad()
def fit_block_scales(net, images, batch=500):
    """Set net.block_scales so that each feature block has the total variance (trace of its covariance) on images of
    the last block, the fc layer, whose scale stays 1 (so that `head` reads it unchanged)."""
    net.eval()
    net.block_scales.fill_(1.0)
    parts = [net.blocks(images[i:i + batch]) for i in range(0, len(images), batch)]
    blocks = [torch.cat(block) for block in zip(*parts)]
    totals = torch.stack([b.double().var(0).sum() for b in blocks])
    net.block_scales.copy_((totals[-1] / totals).sqrt().float())
    return net


def train_wide_classifier(dataset=None, epochs=8, seed=0, heldout=1000, batch=64, lr=3e-3, device="cpu",
                          augment=True, **arch):
    """Train WideMnistNet on dataset.images / .labels (default: the shipped 8,000 digits) for `epochs` with Adam and a
    one-cycle schedule, random affine augmentation (augment=True), `heldout` seeded-random digits kept out for
    net.meta["heldout_accuracy"]; then fit the block scales on the training digits."""
    images, labels, train_idx, test_idx, generator = training_split(dataset, heldout, epochs, batch, seed)
    train_x, train_y = images[train_idx], labels[train_idx]
    device = torch.device(device)
    tic = time.time()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # seeded init and dropout
        torch.manual_seed(seed)
        net = WideMnistNet(**arch).to(device)
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        steps = epochs * -(-len(train_x) // batch)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
        net.train()
        for _ in range(epochs):
            permutation = torch.randperm(len(train_x), generator=generator)
            for i in range(0, len(permutation), batch):
                idx = permutation[i:i + batch]
                x = random_affine(train_x[idx], generator) if augment else train_x[idx]
                loss = F.cross_entropy(net(x.to(device)), train_y[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        fit_block_scales(net, train_x.to(device))
    net.eval()
    heldout_accuracy = (_predict(net, images[test_idx]) == labels[test_idx]).float().mean().item() if heldout else None
    net.meta = {"arch": ARCH, "widths": list(net.widths), "fc_dim": net.fc.out_features, "pooled": net.pooled,
                "dropout": net.dropout, "feature_dim": net.feature_dim, "heldout_accuracy": heldout_accuracy,
                "heldout": heldout, "epochs": epochs, "seed": seed, "batch": batch, "lr": lr, "augment": augment,
                "train_size": len(train_idx), "train_seconds": round(time.time() - tic, 1),
                "torch": str(torch.__version__), "threads": torch.get_num_threads()}
    net.meta["weights_sha256"] = weights_sha256(net)
    return net


def save_wide_feature_net(net, path):
    """Write {"state_dict", "meta"} to path atomically (temporary file, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"state_dict": state_dict, "meta": dict(getattr(net, "meta", {}), arch=ARCH)}, tmp)
    os.replace(tmp, path)


def load_wide_feature_net(path=None, device="cpu", train_if_missing=True):
    """Load the wide feature net from path (default: the shipped metrics/mnist_feature_net_wide.pt, else <cache
    dir>/mnist_feature_net_wide.pt), training and caching it first when missing and train_if_missing is set."""
    path, trained = checkpoint_or_trained(path, SHIPPED, CHECKPOINT_NAME, train_if_missing, train_wide_classifier,
                                          save_wide_feature_net, "wide MNIST feature net",
                                          "python -m metrics.mnist_net_wide", "a few minutes")
    if trained is not None:
        return trained.to(device).eval()
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        meta = dict(checkpoint["meta"])
        if meta.get("arch") != ARCH:
            raise KeyError("arch")
        net = WideMnistNet(widths=tuple(meta["widths"]), fc_dim=int(meta["fc_dim"]), dropout=float(meta["dropout"]),
                           pooled=bool(meta["pooled"]))
        net.load_state_dict(checkpoint["state_dict"])
        net.meta = meta
    except Exception as error:  # truncated zip, wrong pickle, missing keys, shape mismatch: all mean "corrupt"
        raise ValueError(f"corrupt or not a wide MNIST feature net checkpoint: {path} ({type(error).__name__}); "
                         f"delete it to retrain") from None
    return net.to(device).eval()


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def weights_sha256(net):
    """sha256 of the network's state (names, shapes, float32 bytes), independent of the file's metadata: a retrain with
    the same seed, code, torch and thread count on the same kind of CPU gives the same digest."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(f"{name}:{list(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m metrics.mnist_net_wide",
                                     description="Train the wide MNIST feature net (see the module docstring).")
    parser.add_argument("--out", default=str(cache_dir() / CHECKPOINT_NAME), help="checkpoint path to write")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the shipped net: 1)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    try:
        net = train_wide_classifier(epochs=args.epochs, seed=args.seed, device=args.device)
        save_wide_feature_net(net, args.out)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        parser.exit(2, f"error: {str(error).strip().splitlines()[0]}\n")
    print(f"held-out accuracy {net.meta['heldout_accuracy']:.4f} ({time.time() - start:.0f} s); wrote {args.out} "
          f"(sha256 {sha256(args.out)})")


if __name__ == "__main__":
    main()
