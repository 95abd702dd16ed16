"""The offline MNIST feature network: a small CNN classifier the project trains itself (about 98.5% held-out
accuracy on the shipped 8,000 digits), whose 128-d penultimate layer (before its ReLU) plays the role of
Inception's pool3 in an MNIST-FID. Such FIDs are comparable only between runs scored with the same checkpoint, so
the project ships one (metrics/mnist_feature_net.pt, seed 0, 6 epochs, held-out accuracy in its meta) and every
default scores with it; a net trained on another machine (CPU vs GPU kernels, thread counts) gives other features
and other FIDs (the same samples: 36.2 here, 42.6 with a net trained on a fresh clone).

    python -m metrics.mnist_net --out PATH        # train (under a minute on one CPU core) and save

The checkpoint is a plain dict {"state_dict", "meta"} written atomically and read with weights_only=True.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CHECKPOINT_NAME = "mnist_feature_net.pt"
SHIPPED = Path(__file__).with_name(CHECKPOINT_NAME)  # the checkpoint bench/ figures before the wide net were scored with
# The feature net the MNIST metrics (fid-mnist, precision-recall-mnist, class-histogram-mnist, runs.eval.mnist_report)
# use when none is passed: "wide" (metrics/mnist_net_wide.py, metrics/mnist_feature_net_wide.pt, validated against
# this one by `python -m runs.bench metric`, bench/metric_mnist.md) or "shipped" (MnistNet, SHIPPED above).
METRIC_NET = "wide"


def cache_dir():
    """The user cache directory: $FASTDIFF_CACHE, else $XDG_CACHE_HOME/fastdiff, else ~/.cache/fastdiff."""
    if os.environ.get("FASTDIFF_CACHE"):
        return Path(os.environ["FASTDIFF_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fastdiff"
    return Path.home() / ".cache" / "fastdiff"


class MnistNet(nn.Module):
    """conv(16) conv(32) pool conv(64) pool -> fc(feature_dim) -> fc(10)."""

    def __init__(self, feature_dim=128):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.feature = nn.Linear(64 * 7 * 7, feature_dim)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x):
        """Pre-activation output of the feature layer, [B, feature_dim], for x in [-1, 1] of shape [B, 1, 28, 28]."""
        return self.feature(self.convs(x).flatten(1))

    def forward(self, x):
        return self.head(F.dropout(F.relu(self.features(x)), 0.3, self.training))


def _as_images(images):
    """uint8 [N, 1, 28, 28] or [N, 28, 28] (array or tensor) -> float tensor [N, 1, 28, 28] in [-1, 1]."""
    images = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if images.dtype != torch.uint8:
        raise ValueError(f"MNIST images must be uint8 in [0, 255], got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28) or len(images) == 0:
        raise ValueError(f"MNIST images must be [N >= 1, 1, 28, 28] or [N, 28, 28], got shape {tuple(images.shape)}")
    return images.float() / 127.5 - 1


def _default_dataset():
    from data import DATASETS
    return DATASETS["mnist"]()


def _random_shift(x, generator, max_shift=2):
    """Translate the batch by one random offset of up to max_shift pixels, padding with the background value -1."""
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + 28, dx:dx + 28]


def _predict(net, x, batch=500):
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    with torch.inference_mode():
        predictions = torch.cat([net(x[i:i + batch].to(device)).argmax(1).cpu() for i in range(0, len(x), batch)])
    net.train(was_training)
    return predictions


def accuracy(net, images, labels):
    """Fraction of uint8 MNIST images that net classifies as labels."""
    return (_predict(net, _as_images(images)) == torch.as_tensor(np.asarray(labels)).long()).float().mean().item()


def _fit(net, images, labels, epochs, batch, lr, generator, device):
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * -(-len(images) // batch))
    net.train()
    for _ in range(epochs):
        permutation = torch.randperm(len(images), generator=generator)
        for i in range(0, len(permutation), batch):
            idx = permutation[i:i + batch]
            loss = F.cross_entropy(net(_random_shift(images[idx], generator).to(device)), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return net.eval()


def training_split(dataset, heldout, epochs, batch, seed):
    """(images, labels, train indices, held-out indices, the seeded generator that drew them, for the training's
    further draws) of a feature net's training digits (default: the shipped 8,000), `heldout` of them kept out; a
    one-line ValueError for settings that cannot train."""
    dataset = _default_dataset() if dataset is None else dataset
    images, labels = _as_images(dataset.images), torch.as_tensor(np.asarray(dataset.labels)).long()
    if len(images) != len(labels) or not 0 <= heldout < len(images) or epochs < 1 or batch < 1:
        raise ValueError(f"need as many labels as images, 0 <= heldout < N, epochs >= 1 and batch >= 1; got "
                         f"{len(images)} images, {len(labels)} labels, heldout={heldout}, epochs={epochs}, "
                         f"batch={batch}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    return images, labels, order[heldout:], order[:heldout], generator


def train_mnist_classifier(dataset=None, epochs=6, seed=0, device="cpu", heldout=1000, batch=64, lr=2e-3):
    """Train MnistNet on dataset.images / dataset.labels (default: the shipped 8,000 digits), holding out
    `heldout` seeded-random digits for the accuracy stored in net.meta["heldout_accuracy"]."""
    images, labels, train_idx, test_idx, generator = training_split(dataset, heldout, epochs, batch, seed)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # seeded init and dropout
        torch.manual_seed(seed)
        net = _fit(MnistNet().to(device), images[train_idx], labels[train_idx], epochs, batch, lr, generator, device)
    heldout_accuracy = (_predict(net, images[test_idx]) == labels[test_idx]).float().mean().item() if heldout else None
    net.meta = {"feature_dim": net.feature.out_features, "heldout_accuracy": heldout_accuracy,
                "epochs": epochs, "seed": seed, "train_size": len(train_idx)}
    return net


def save_mnist_feature_net(net, path):
    """Write {"state_dict", "meta"} to path atomically (temporary file, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    meta = dict(getattr(net, "meta", {}), feature_dim=net.feature.out_features)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"state_dict": state_dict, "meta": meta}, tmp)
    os.replace(tmp, path)


def checkpoint_or_trained(path, shipped, name, train_if_missing, train, save, what, command, cost):
    """(path of the feature-net checkpoint to load, None), or (path, the net freshly trained and saved there) when
    the file is missing and train_if_missing is set. path None: the shipped file, else <cache dir>/name."""
    if path is None:
        path = shipped if shipped.exists() else cache_dir() / name
    path = Path(path)
    if path.exists():
        return path, None
    if not train_if_missing:
        raise FileNotFoundError(f"{what} not found at {path}; train it with `{command} --out {path}`")
    print(f"{what} not found at {path}; training it now ({cost} on a CPU) and caching it", file=sys.stderr)
    net = train()
    save(net, path)
    return path, net


def load_mnist_feature_net(path=None, device="cpu", train_if_missing=True):
    """Load the feature net from path (default: the shipped metrics/mnist_feature_net.pt, else
    <cache dir>/mnist_feature_net.pt), training and caching it first when the file is missing and train_if_missing
    is set."""
    path, trained = checkpoint_or_trained(path, SHIPPED, CHECKPOINT_NAME, train_if_missing, train_mnist_classifier,
                                          save_mnist_feature_net, "MNIST feature net", "python -m metrics.mnist_net",
                                          "about a minute")
    if trained is not None:
        return trained.to(device).eval()
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        wide = checkpoint["meta"].get("arch") == "wide"  # a metrics/mnist_net_wide.py checkpoint
        if not wide:
            net = MnistNet(feature_dim=int(checkpoint["meta"]["feature_dim"]))
            net.load_state_dict(checkpoint["state_dict"])
            net.meta = dict(checkpoint["meta"])
    except Exception as error:  # truncated zip, wrong pickle, missing keys, shape mismatch: all mean "corrupt"
        raise ValueError(f"corrupt MNIST feature net checkpoint {path} ({type(error).__name__}); "
                         f"delete it to retrain") from None
    if wide:
        from metrics.mnist_net_wide import load_wide_feature_net
        return load_wide_feature_net(path, device=device, train_if_missing=False)
    return net.to(device).eval()


def load_metric_net(device="cpu", train_if_missing=True, kind=None):
    """The feature net the MNIST metrics use when none is passed: kind (default METRIC_NET) "wide" (the shipped
    metrics/mnist_feature_net_wide.pt) or "shipped" (load_mnist_feature_net's default)."""
    kind = METRIC_NET if kind is None else kind
    if kind == "wide":
        from metrics.mnist_net_wide import load_wide_feature_net
        return load_wide_feature_net(device=device, train_if_missing=train_if_missing)
    if kind == "shipped":
        return load_mnist_feature_net(device=device, train_if_missing=train_if_missing)
    raise ValueError(f"unknown MNIST metric net {kind!r}; known: wide, shipped")


def mnist_features(net, images, batch=500):
    """Features [N, feature_dim] (float32, CPU) of uint8 MNIST images [N, 1, 28, 28] or [N, 28, 28]."""
    x = _as_images(images)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    with torch.inference_mode():
        features = torch.cat([net.features(x[i:i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)])
    net.train(was_training)
    return features


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m metrics.mnist_net",
                                     description="Train the offline MNIST feature net used by fid-mnist.")
    parser.add_argument("--out", default=str(cache_dir() / CHECKPOINT_NAME), help="checkpoint path to write")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        net = train_mnist_classifier(epochs=args.epochs, seed=args.seed, device=args.device)
        save_mnist_feature_net(net, args.out)
    except (ValueError, FileNotFoundError, RuntimeError) as error:  # RuntimeError: e.g. an unusable device
        parser.exit(2, f"error: {str(error).strip().splitlines()[0]}\n")
    print(f"held-out accuracy {net.meta['heldout_accuracy']:.4f} ({time.time() - start:.0f} s); wrote {args.out}")


if __name__ == "__main__":
    main()
