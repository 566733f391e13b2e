"""Every shipped YAML is exercised through the real CLI (torchgeo style).

Offline-default configs train, test and predict on a few tiny synthetic batches with their real pretrained
towers; paper configs (hub checkpoints, GPUs) are built architecture-only through ``pefttune inspect``.
"""

import glob
import json
import os

import pytest
import torch

from pefttune.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
PAPER_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "paper", "*.yaml")))

# The trainable parameter counts each paper setting must report (methods.md and the issues).
PAPER_TRAINABLE = {
    "apex_clip_vitb16.yaml": {"trainable_params": 282_112, "method": 282_112},
    "cma_clip_vitb32.yaml": {"trainable_params": 519_168, "method": 519_168},
    "lora_clip_vitb16.yaml": {"trainable_params": 184_320, "method": 184_320},
    "duet_vitb16_bert.yaml": {"method": 113_375_256},
    "apex_openclip_vitb16.yaml": {"trainable_params": 282_112, "method": 282_112},
    "cma_openclip_vitb32.yaml": {"trainable_params": 519_168, "method": 519_168},
    "lora_openclip_vitb16.yaml": {"trainable_params": 184_320, "method": 184_320},
}

TINY = [
    "--trainer.max_steps=1",
    "--trainer.max_epochs=1",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.limit_predict_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.logger=false",
    "--data.init_args.batch_size=4",
    "--data.init_args.source.init_args.num_train=8",
    "--data.init_args.source.init_args.num_val=4",
    "--data.init_args.source.init_args.num_test=4",
]


def test_every_method_ships_an_offline_and_a_paper_config():
    names = {os.path.basename(p) for p in OFFLINE_CONFIGS}
    assert {"duet.yaml", "cma.yaml", "lora.yaml", "apex.yaml", "full.yaml", "lit.yaml"} <= names
    assert set(PAPER_TRAINABLE) <= {os.path.basename(p) for p in PAPER_CONFIGS}


@pytest.mark.parametrize("config", OFFLINE_CONFIGS, ids=os.path.basename)
def test_offline_config_fits_tests_and_predicts(config, tmp_path):
    root = str(tmp_path)
    main(
        [
            "fit",
            "--config",
            config,
            *TINY,
            f"--trainer.default_root_dir={root}",
            f"--checkpoint.dirpath={root}/ckpt",
        ]
    )
    last = os.path.join(root, "ckpt", "last.ckpt")
    assert os.path.exists(last)
    main(["test", "--config", config, *TINY, f"--trainer.default_root_dir={root}", f"--ckpt_path={last}"])
    output = os.path.join(root, "embeddings.pt")
    main(
        [
            "predict",
            "--config",
            config,
            *TINY,
            f"--trainer.default_root_dir={root}",
            f"--ckpt_path={last}",
            "--trainer.callbacks+=pefttune.callbacks.EmbeddingWriter",
            f"--trainer.callbacks.output_path={output}",
        ]
    )
    embeddings = torch.load(output)
    assert embeddings["image_embeds"].shape[0] == embeddings["image_ids"].shape[0] > 0
    assert embeddings["text_embeds"].shape[0] == embeddings["caption_image_ids"].shape[0] > 0
    norms = embeddings["image_embeds"].norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=os.path.basename)
def test_paper_config_builds_without_weights(config, capsys):
    main(["inspect", "--config", config, "--no-weights", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert set(report["trainable_by_group"]) == {"method", "backbone", "head", "temperature"}
    assert report["trainable_params"] == sum(report["trainable_by_group"].values())
    expected = PAPER_TRAINABLE.get(os.path.basename(config), {})
    if "trainable_params" in expected:
        assert report["trainable_params"] == expected["trainable_params"]
    if "method" in expected:
        assert report["trainable_by_group"]["method"] == expected["method"]
