"""GradCache under two gloo processes equals the single-process full batch (functional core and ``fit``).

The functional check follows the protocol :class:`~pefttune.module.DualEncoderModule` uses: the step's
backward passes run under ``DistributedDataParallel.no_sync()``, each rank encodes its own rows in chunks,
the loss all-gathers the embeddings with gradient (so each rank's embedding gradient holds every rank's
contribution), and :func:`~pefttune.gradcache.average_gradients` then does what DDP's reducer would.
"""

from __future__ import annotations

import datetime
import functools
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_gradcache import _fit
from test_losses_ddp import LOSSES, SPLITS, free_port, make_case
from torch import nn

from pefttune.gradcache import average_gradients, cached_embeddings

pytestmark = pytest.mark.ddp

WORLD_SIZE = 2
TIMEOUT_S = 120.0
CASES = [(loss, split) for loss in ("infonce_local_grad", "multipos_sum", "siglip") for split in SPLITS]


def grad_cache_loss(model, loss_fn, batch, chunk):
    """The loss over ``batch`` from chunk-cached embeddings (the towers of test_losses_ddp's model)."""
    images = cached_embeddings(
        lambda x: F.normalize(model.image_tower(x), dim=-1), batch["images"].split(chunk)
    )
    texts = cached_embeddings(lambda x: F.normalize(model.text_tower(x), dim=-1), batch["texts"].split(chunk))
    return loss_fn(
        images,
        texts,
        model.log_scale.exp(),
        model.bias,
        image_ids=batch["image_ids"],
        text_ids=batch["text_ids"],
    )


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
        results = {}
        for loss_name, split in CASES:
            model, loss_fn, batch = make_case(loss_name, split)
            sizes = SPLITS[split]
            start = sum(sizes[:rank])
            local = {key: value[start : start + sizes[rank]] for key, value in batch.items()}
            ddp = nn.parallel.DistributedDataParallel(model)
            with ddp.no_sync():
                loss = grad_cache_loss(model, loss_fn, local, chunk=2)
                loss.backward()
            average_gradients(model.parameters())
            results[(loss_name, split)] = {
                "loss": loss.detach(),
                "grads": {name: p.grad.detach().clone() for name, p in model.named_parameters()},
            }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp_gradcache")
    context = mp.start_processes(
        worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("loss_name, split", CASES, ids=[f"{loss}-{split}" for loss, split in CASES])
def test_grad_cache_under_ddp_equals_the_single_process_full_batch(ddp_results, loss_name, split):
    assert loss_name in LOSSES
    model, loss_fn, batch = make_case(loss_name, split)
    assert not dist.is_initialized()
    loss = loss_fn(
        *model(batch["images"], batch["texts"]), image_ids=batch["image_ids"], text_ids=batch["text_ids"]
    )
    loss.backward()
    per_rank = [results[(loss_name, split)] for results in ddp_results]
    torch.testing.assert_close(
        sum(r["loss"] for r in per_rank) / WORLD_SIZE, loss.detach(), rtol=1e-9, atol=1e-12
    )
    for rank_result in per_rank:
        for name, p in model.named_parameters():
            assert p.grad.abs().max() > 0, name
            torch.testing.assert_close(
                rank_result["grads"][name], p.grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
            )


@pytest.mark.slow
def test_fit_with_grad_cache_under_ddp_equals_plain_ddp():
    """Lightning's ddp_spawn: the module's no_sync + averaging path gives DDP's own result."""
    options = {"strategy": "ddp_spawn", "devices": 2, "optimizer": functools.partial(torch.optim.SGD, lr=0.5)}
    plain, cached = _fit(None, **options), _fit(3, **options)
    for (name, a), (_, b) in zip(plain.named_parameters(), cached.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
