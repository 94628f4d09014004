"""LMEvaluation, HTMLReport and StepProgressBar configured in a ``lightning-sae`` YAML config."""

import re
import sys

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_sae.cli import main


@pytest.fixture
def llama_folder(tokenizer, tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    folder = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_callbacks_from_yaml(llama_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lightning-sae"])
    config = {
        "trainer": {
            "max_steps": 4, "log_every_n_steps": 2, "default_root_dir": str(tmp_path / "run"),
            "enable_model_summary": False, "enable_checkpointing": False,
            "callbacks": [
                {"class_path": "lightning_sae.evaluation.LMEvaluation",
                 "init_args": {"every_n_steps": 2, "n_rows": 4, "batch_rows": 2}},
                {"class_path": "lightning_sae.evaluation.HTMLReport",
                 "init_args": {"n_latents": 4, "n_rows": 4}},
                {"class_path": "lightning_sae.evaluation.StepProgressBar"},
            ],
        },
        "model": {
            "class_path": "lightning_sae.TopKSAE", "init_args": {"d_sae": 64, "k": 4, "seed": 0},
        },
        "data": {
            "class_path": "lightning_sae.ActivationDataModule",
            "init_args": {
                "model": str(llama_folder), "hook_names": "blocks.1.hook_resid_post",
                "dataset": {"class_path": "lightning_sae.data.shakespeare_documents"},
                "context_size": 32, "batch_size": 64, "shuffle_buffer_tokens": 512,
                "holdout_documents": 1, "exclude_special_tokens": True,
            },
        },
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    report = (tmp_path / "run" / "report.html").read_text()
    assert "CE loss recovered" in report and report.count('class="latent"') == 4
    metrics = (tmp_path / "run" / "lightning_logs" / "version_0").rglob("events.out.tfevents*")
    assert list(metrics)  # the TensorBoard logger received the evaluation
    out = capsys.readouterr().out
    assert "train" in out and "4/4" in out and "v_num" not in out and "Epoch" not in out
    last = out.replace("\r", "\n").strip().splitlines()[-1]
    number = r"-?[\d.]+(?:e[-+]\d+)?"
    pattern = rf"4/4 .*l0={number}, ev={number}, tok/s={number}, ce_rec={number}"
    assert re.search(pattern, last), last
