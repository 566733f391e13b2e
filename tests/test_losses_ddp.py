"""Two gloo processes under DistributedDataParallel reproduce the single-process loss and gradients.

One spawn runs every case (spawning is the slow part). For each case both ranks build the same tiny
dual encoder, wrap it in DDP, take their slice of one global batch, compute the loss and call
``backward()``. The checks:

* loss value: the *mean over ranks* of the per-rank losses equals the single-process loss over the
  global batch (that is what Lightning's ``self.log(..., sync_dist=True)`` reports);
* gradients: after DDP's averaging, every parameter's gradient (identical on both ranks) equals the
  single-process gradient over the global batch. This holds for uneven per-rank sizes too, because the
  losses normalise local sums by ``W / N`` (global mean batch size) rather than ``1 / B_local``: then
  ``(1/W) * sum_r L_r`` is the global loss as a function of every parameter, for any split.

The one approximate mode (``InfoNCELoss(gather_with_grad=False, local_loss=True)``) is compared with the
relationship it satisfies exactly: the single-process gradient of the global loss in which, for each
anchor, the embeddings held by the other ranks are detached.
"""

from __future__ import annotations

import datetime
import math
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from pefttune.losses import (
    InfoNCELoss,
    MultiPositiveInfoNCELoss,
    SigLIPLoss,
    gather_no_grad,
    gather_with_grad,
)

pytestmark = pytest.mark.ddp

WORLD_SIZE = 2
TIMEOUT_S = 120.0
SPLITS = {"even": (4, 4), "uneven": (3, 2)}
# Duplicates inside and across ranks for the even split (image 0 on both ranks, caption 11 on both)
# and for the uneven split (image 0 on ranks 0/1, caption 12 on ranks 0/1).
IMAGE_IDS = {"even": [0, 1, 2, 0, 0, 5, 6, 2], "uneven": [0, 1, 2, 0, 4]}
TEXT_IDS = {"even": [10, 11, 12, 13, 14, 11, 16, 17], "uneven": [10, 11, 12, 12, 14]}
LOSSES = {
    "infonce_local_grad": lambda: InfoNCELoss(),
    "infonce_global_grad": lambda: InfoNCELoss(local_loss=False),
    "infonce_global_nograd": lambda: InfoNCELoss(gather_with_grad=False, local_loss=False),
    "infonce_local_nograd": lambda: InfoNCELoss(gather_with_grad=False, local_loss=True),
    "multipos_sum": lambda: MultiPositiveInfoNCELoss("sum"),
    "multipos_mean": lambda: MultiPositiveInfoNCELoss("mean"),
    "siglip": lambda: SigLIPLoss(),
}
CASES = [(loss, split) for loss in LOSSES for split in SPLITS]


class TinyDualEncoder(nn.Module):
    """Two linear towers, a learnable log-scale and, for SigLIP, a learnable bias."""

    def __init__(self, with_bias: bool) -> None:
        super().__init__()
        self.image_tower = nn.Linear(6, 4)
        self.text_tower = nn.Linear(5, 4)
        self.log_scale = nn.Parameter(torch.tensor(math.log(6.0)))
        # A parameter DDP never sees in the graph would stall its reducer, so only SigLIP owns a bias.
        self.bias = nn.Parameter(torch.tensor(-2.0)) if with_bias else None

    def forward(self, image_inputs, text_inputs):
        return (
            F.normalize(self.image_tower(image_inputs), dim=-1),
            F.normalize(self.text_tower(text_inputs), dim=-1),
            self.log_scale.exp(),
            self.bias,
        )


def make_case(loss_name, split):
    """Model, loss and global batch of one case, identical in every process."""
    torch.manual_seed(0)
    loss_fn = LOSSES[loss_name]()
    model = TinyDualEncoder(loss_fn.needs_bias).double()
    total = sum(SPLITS[split])
    gen = torch.Generator().manual_seed(1)
    batch = {
        "images": torch.randn(total, 6, generator=gen, dtype=torch.float64),
        "texts": torch.randn(total, 5, generator=gen, dtype=torch.float64),
        "image_ids": torch.tensor(IMAGE_IDS[split]),
        "text_ids": torch.tensor(TEXT_IDS[split]),
    }
    return model, loss_fn, batch


def run_loss(model, loss_fn, batch):
    image_embeds, text_embeds, scale, bias = model(batch["images"], batch["texts"])
    return loss_fn(
        image_embeds, text_embeds, scale, bias, image_ids=batch["image_ids"], text_ids=batch["text_ids"]
    )


def check_gather_helpers(rank, sizes):
    """Uneven all-gather: values in rank order, backward = sum over ranks of each rank's gradient."""
    total = sum(sizes)
    full = torch.arange(total * 3, dtype=torch.float64).reshape(total, 3)
    start = sum(sizes[:rank])
    local = full[start : start + sizes[rank]].clone().requires_grad_()
    gathered = gather_with_grad(local)
    torch.testing.assert_close(gathered, full, rtol=0.0, atol=0.0)
    # Rank-dependent weights: the gradient of sum_r <gathered, w_r> w.r.t. rank r's slice is sum_r w_r.
    weights = torch.linspace(-1.0, 1.0, total * 3, dtype=torch.float64).reshape(total, 3) * (rank + 1)
    (gathered * weights).sum().backward()
    expected = sum(r + 1 for r in range(WORLD_SIZE)) / (rank + 1) * weights[start : start + sizes[rank]]
    torch.testing.assert_close(local.grad, expected, rtol=0.0, atol=1e-12)
    ids = torch.arange(total)[start : start + sizes[rank]]
    assert torch.equal(gather_no_grad(ids), torch.arange(total))


def worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        for sizes in SPLITS.values():
            check_gather_helpers(rank, sizes)
        results = {}
        for loss_name, split in CASES:
            model, loss_fn, batch = make_case(loss_name, split)
            sizes = SPLITS[split]
            start = sum(sizes[:rank])
            local_batch = {key: value[start : start + sizes[rank]] for key, value in batch.items()}
            ddp = nn.parallel.DistributedDataParallel(model)
            loss = run_loss(ddp, loss_fn, local_batch)
            loss.backward()
            results[(loss_name, split)] = {
                "loss": loss.detach(),
                "grads": {name: p.grad.detach().clone() for name, p in model.named_parameters()},
            }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp_losses")
    context = mp.start_processes(
        worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    # join() re-raises a worker's exception with its traceback.
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def reference_block_detached_infonce(model, batch, sizes):
    """Global InfoNCE where each anchor sees other ranks' embeddings as constants (no-grad gather)."""
    images, texts, scale, _ = model(batch["images"], batch["texts"])
    total = images.shape[0]
    terms = []
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        owner = torch.zeros(total, 1, dtype=torch.bool)
        owner[rows] = True
        visible_texts = torch.where(owner, texts, texts.detach())
        visible_images = torch.where(owner, images, images.detach())
        targets = torch.arange(start, start + size)
        terms.append(F.cross_entropy(scale * images[rows] @ visible_texts.T, targets, reduction="sum"))
        terms.append(F.cross_entropy(scale * texts[rows] @ visible_images.T, targets, reduction="sum"))
        start += size
    return 0.5 * sum(terms) / total


@pytest.mark.parametrize("loss_name, split", CASES, ids=[f"{loss}-{split}" for loss, split in CASES])
def test_ddp_matches_single_process(ddp_results, loss_name, split):
    model, loss_fn, batch = make_case(loss_name, split)
    assert not dist.is_initialized()  # the reference must take the single-process path
    reference_loss = run_loss(model, loss_fn, batch)
    if loss_name == "infonce_local_nograd":
        # Same forward value, but gradients follow the block-detached objective.
        surrogate = reference_block_detached_infonce(model, batch, SPLITS[split])
        torch.testing.assert_close(surrogate, reference_loss, rtol=1e-12, atol=0.0)
        surrogate.backward()
    else:
        reference_loss.backward()
    reference_grads = {name: p.grad for name, p in model.named_parameters()}

    per_rank = [results[(loss_name, split)] for results in ddp_results]
    mean_loss = sum(r["loss"] for r in per_rank) / WORLD_SIZE
    torch.testing.assert_close(mean_loss, reference_loss.detach(), rtol=1e-9, atol=1e-12)
    for rank_result in per_rank:
        assert rank_result["grads"].keys() == reference_grads.keys()
        for name, grad in reference_grads.items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(
                rank_result["grads"][name], grad, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}"
            )


def test_approximate_mode_really_differs(ddp_results):
    """The no-grad local mode's tower gradients are not the global ones, so its reference is needed."""
    model, loss_fn, batch = make_case("infonce_local_nograd", "even")
    run_loss(model, loss_fn, batch).backward()
    ddp_grad = ddp_results[0][("infonce_local_nograd", "even")]["grads"]
    assert not torch.allclose(ddp_grad["image_tower.weight"], model.image_tower.weight.grad, atol=1e-6)
    torch.testing.assert_close(ddp_grad["log_scale"], model.log_scale.grad, rtol=1e-9, atol=1e-12)


def test_local_normalisation_would_break_uneven_splits(ddp_results):
    """Per-rank values differ from local means on an uneven split: the W/N weighting is doing work."""
    model, loss_fn, batch = make_case("infonce_local_grad", "uneven")
    per_rank = [results[("infonce_local_grad", "uneven")]["loss"] for results in ddp_results]
    sizes = SPLITS["uneven"]
    total = sum(sizes)
    # L_r = (W/N) * (sum of local terms)  =>  local mean = L_r * N / (W * B_r); averaging local means
    # over ranks would weight the rank with fewer samples more than the single process does.
    local_means = [loss * total / (WORLD_SIZE * size) for loss, size in zip(per_rank, sizes, strict=True)]
    naive = sum(local_means) / WORLD_SIZE
    global_loss = run_loss(model, loss_fn, batch).detach()
    assert abs(float(naive - global_loss)) > 1e-4
