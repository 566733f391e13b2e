"""Every shipped video YAML runs through the real CLI on a few tiny generated clips; the MSR-VTT paper
config builds architecture-only with the paper's trainable parameter count; the MSR-VTT suite expands."""

import glob
import json
import os

import pytest
import torch

from pefttune.benchmark.suite import Suite
from pefttune.cli import main
from pefttune.strategies.registry import methods

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VIDEO_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "video", "*.yaml")))

TINY = [
    "--trainer.max_steps=1",
    "--trainer.max_epochs=1",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.limit_predict_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.logger=false",
    "--data.init_args.batch_size=4",
    "--data.init_args.num_frames=2",
    "--data.init_args.source.init_args.num_train=8",
    "--data.init_args.source.init_args.num_val=4",
    "--data.init_args.source.init_args.num_test=4",
    "--data.init_args.source.init_args.num_frames=3",
    "--data.init_args.source.init_args.image_size=32",
    "--model.init_args.image_tower.init_args.image_size=32",
]


def test_every_registered_method_ships_a_video_config():
    # Every method works on video, so each registered method has configs/video/<name>.yaml.
    assert {os.path.basename(p) for p in VIDEO_CONFIGS} == {f"{spec.name}.yaml" for spec in methods()}


@pytest.mark.parametrize("config", VIDEO_CONFIGS, ids=os.path.basename)
def test_video_config_fits_tests_and_predicts(config, tmp_path):
    root = str(tmp_path)
    common = [*TINY, f"--trainer.default_root_dir={root}"]
    main(["fit", "--config", config, *common, f"--checkpoint.dirpath={root}/ckpt"])
    last = os.path.join(root, "ckpt", "last.ckpt")
    assert os.path.exists(last)
    main(["test", "--config", config, *common, f"--ckpt_path={last}"])
    output = os.path.join(root, "embeddings.pt")
    main(
        [
            "predict",
            "--config",
            config,
            *common,
            f"--ckpt_path={last}",
            "--trainer.callbacks+=pefttune.callbacks.EmbeddingWriter",
            f"--trainer.callbacks.output_path={output}",
        ]
    )
    embeddings = torch.load(output)
    # One embedding per clip (not per frame), every caption of the 4 test clips.
    assert embeddings["image_embeds"].shape[0] == embeddings["image_ids"].shape[0] == 4
    assert embeddings["text_embeds"].shape[0] == embeddings["caption_image_ids"].shape[0] == 4 * 5
    norms = embeddings["image_embeds"].norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)


def test_the_temporal_aggregator_is_chosen_in_the_config(capsys):
    config = os.path.join(ROOT, "configs", "video", "cma.yaml")
    main(["inspect", "--config", config, "--no-weights", "--json"])
    mean = json.loads(capsys.readouterr().out)
    assert mean["trainable_by_group"]["temporal"] == 0
    seq_transf = (
        '{"class_path": "pefttune.towers.temporal.SequenceTransformer", "init_args": {"num_layers": 1}}'
    )
    main(
        ["inspect", "--config", config, "--no-weights", "--json", f"--model.init_args.temporal={seq_transf}"]
    )
    seq = json.loads(capsys.readouterr().out)
    # One CLIP block at width 512 (12 * 512^2 + 13 * 512) plus 77 x 512 frame positions.
    assert seq["trainable_by_group"]["temporal"] == 12 * 512**2 + 13 * 512 + 77 * 512
    assert seq["trainable_params"] == mean["trainable_params"] + seq["trainable_by_group"]["temporal"]


def test_msrvtt_paper_config_has_the_papers_trainable_parameters(capsys):
    config = os.path.join(ROOT, "configs", "paper", "cma_clip_vitb32_msrvtt.yaml")
    main(["inspect", "--config", config, "--no-weights", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["trainable_params"] == 519_168
    assert report["trainable_by_group"] == {
        "method": 519_168,
        "backbone": 0,
        "head": 0,
        "temperature": 0,
        "temporal": 0,
    }


def test_msrvtt_suite_runs_all_six_methods_on_the_video_configs():
    suite = Suite.from_file(os.path.join(ROOT, "benchmarks", "msrvtt.yaml"))
    runs = suite.runs(variables={"data_root": "/data/msrvtt"})
    methods = {run.method for run in runs}
    assert methods == {"apex", "apex_no_ensemble", "cma", "duet", "full", "lit", "lora"}
    for run in runs:
        method = run.trained_as or run.method
        assert run.configs[0].replace(os.sep, "/").endswith(f"configs/video/{method}.yaml")
        overrides = dict(run.overrides)
        assert overrides["data.init_args.source"]["class_path"] == "pefttune.data.sources.MSRVTT"
        assert (
            overrides["data.init_args.source"]["init_args"]["annotations"] == "/data/msrvtt/annotations.json"
        )
        assert overrides["data.init_args.eval_captions"] in ("all", "one")
    # One training per method and seed, tested under both caption protocols.
    trainings = {run.run_id for run in runs if not run.tests_another_training}
    assert len(trainings) == 18
    assert all(run.training_run_id in trainings for run in runs)
    assert {run.dataset for run in runs if run.trained_in} == {"msrvtt_one"}
    assert {run.training_run_id for run in runs if run.method == "apex_no_ensemble"} == {
        f"{dataset}/apex/seed{seed}".replace("msrvtt_one", "msrvtt_all")
        for dataset in ("msrvtt_all", "msrvtt_one")
        for seed in (0, 1, 2)
    }
