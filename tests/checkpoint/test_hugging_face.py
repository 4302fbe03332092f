"""Hugging Face import and export against `transformers` itself: tiny random models of every supported architecture
are built in the test (no download), saved with `save_pretrained`, loaded by megalite (`--load HF_DIR`), and give
the same logits, loss and gradients (fp32, relative 1e-5) at TP1, and for a dense and an MoE architecture under
TP2+SP, PP2 and EP2; export after import is exact, and `from_pretrained` of the export gives the same logits."""
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import transformers

from megalite import parallel_state as ps
from megalite.arguments import build_parser, config_from_namespace, resolve
from megalite.checkpoint import load_checkpoint, read_logical_tensors
from megalite.checkpoint.boxes import Box
from megalite.checkpoint.convert import export_hf, hf_model_config, import_hf
from megalite.checkpoint.hf_tensors import HFReader
from megalite.engine.setup import setup
from megalite.engine.step import forward_backward
from megalite.tensor_parallel import gather_full, get_spec
from megalite.testing import run_distributed
from megalite.testing.hf import ARCHITECTURES, COMMON, make_hf
from megalite.checkpoint.flags import model_flags_from_hf
from megalite.training import checkpoint_meta, global_batch

VOCAB, SEQ, BATCH = 100, 8, 2
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(2))
    return data[:, :-1], data[:, 1:]


def hf_loss_and_grads(model: torch.nn.Module, directory: Path) -> tuple[torch.Tensor, float, dict]:
    """HF logits, mean cross entropy, and the gradients as megalite logical tensors (the gradients are saved as a
    model with `save_pretrained` and read back through megalite's importer)."""
    tokens, labels = batch()
    model.zero_grad()
    logits = model(input_ids=tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad)
    model.save_pretrained(directory)
    config, _ = hf_model_config(directory)
    with HFReader(directory, config) as reader:
        grads = {n: reader.read(n, Box((0,) * len(s.shape), s.shape), torch.float32)
                 for n, s in reader.tensors.items()}
    return logits.detach(), loss.item(), grads


class Pairs(torch.utils.data.Dataset):
    def __init__(self):
        self.tokens, self.labels = batch()

    def __len__(self):
        return BATCH

    def __getitem__(self, i):
        return {"tokens": self.tokens[i], "labels": self.labels[i], "loss_mask": torch.ones(SEQ)}


def megalite_side(directory: str, flags: list[str]) -> dict:
    """megalite with --load DIRECTORY (model flags from its config.json): loss and gathered logical gradients of
    one step on the batch, and the logits (single process only)."""
    ns = build_parser().parse_args(flags + ["--load", directory, "--seq-length", str(SEQ),
                                            "--global-batch-size", str(BATCH), "--hidden-dropout", "0",
                                            "--attention-dropout", "0", "--moe-aux-loss-coeff", "0"])
    model_flags_from_hf(ns)
    config, derived = resolve(config_from_namespace(ns), dist.get_world_size())
    run = setup(config, derived)
    load_checkpoint(directory, run, checkpoint_meta(run))
    logits = None
    if dist.get_world_size() == 1:
        with torch.no_grad():
            logits = run.chunks[0](Pairs().tokens)
    run.reducer.zero_grad()
    loss = forward_backward(run, global_batch(run, Pairs(), 0)).loss
    grads = {}
    for chunk in run.chunks:
        for name, p in chunk.named_parameters():
            spec = get_spec(p)
            grads[name] = gather_full(p.main_grad, spec, getattr(run.groups, spec.group)).reshape(spec.logical()[0])
    out = {"loss": loss, "grads": grads, "logs": run.logs, "logits": logits}
    ps.destroy_model_parallel(run.groups)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_same_step(ours: list[dict], hf_loss: float, hf_grads: dict) -> None:
    loss = next(r["loss"] for r in ours if r["logs"])
    assert loss == pytest.approx(hf_loss, rel=1e-5)
    grads = {}
    for r in ours:
        grads |= r["grads"]
    assert grads.keys() == hf_grads.keys()
    for name, want in hf_grads.items():
        assert _rel(grads[name], want) < 1e-5, (name, _rel(grads[name], want))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_megalite_computes_what_the_hugging_face_model_computes(name, tmp_path, world_of_one):
    model = make_hf(name, tmp_path / "model")
    hf_logits, hf_loss, hf_grads = hf_loss_and_grads(model, tmp_path / "grads")
    ours = megalite_side(str(tmp_path / "model"), ["--micro-batch-size", str(BATCH)])
    logits = ours["logits"]
    assert logits.shape[-1] == 128 and torch.isinf(logits[..., VOCAB:]).all()  # padded ids: -inf
    torch.testing.assert_close(logits[..., :VOCAB], hf_logits, rtol=1e-5, atol=1e-5)
    assert_same_step([ours], hf_loss, hf_grads)


LAYOUTS = {
    "tp2_sp_pp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2",
                   "--micro-batch-size", "1"],
    "ep2_tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size", "2",
                   "--micro-batch-size", "1"],
    "pp2_ep2": ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--micro-batch-size", "1"],
}


@pytest.mark.parametrize("name,layout", [("qwen3", "tp2_sp_pp2"), ("qwen2_moe", "ep2_tp2_sp"),
                                         ("qwen2_moe_4_layers", "tp2_sp_pp2"), ("qwen3_moe", "pp2_ep2")])
def test_imported_models_train_alike_under_parallel_layouts(name, layout, tmp_path, world_of_one):
    model = make_hf(name, tmp_path / "model")
    _, hf_loss, hf_grads = hf_loss_and_grads(model, tmp_path / "grads")
    ours = run_distributed(4, megalite_side, str(tmp_path / "model"), LAYOUTS[layout])
    assert_same_step(ours, hf_loss, hf_grads)


@pytest.mark.parametrize("name", ["llama", "qwen2_moe"])
def test_export_after_import_is_exact_and_transformers_loads_it(name, tmp_path, world_of_one):
    from safetensors.torch import load_file

    model = make_hf(name, tmp_path / "model")
    import_hf(tmp_path / "model", tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "export")
    original, exported = load_file(tmp_path / "model" / "model.safetensors"), load_file(
        tmp_path / "export" / "model.safetensors")
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    tokens, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=tokens).logits, model(input_ids=tokens).logits, rtol=0, atol=0)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[name][1]]
    assert "rank00000.safetensors" in {p.name for p in (tmp_path / "ckpt" / "iter_0000000").iterdir()}
    assert not any(k.startswith("optimizer.") for k in read_logical_tensors(tmp_path / "ckpt" / "iter_0000000"))


def test_sharded_weights_and_the_convert_command(tmp_path, capsys, world_of_one):
    """A model saved in shards (model.safetensors.index.json) loads tensor by tensor, and `megalite convert` prints
    the flags that load its checkpoint."""
    from megalite.cli import main

    model = make_hf("qwen3", tmp_path / "model", max_shard_size="20KB")
    assert len(list((tmp_path / "model").glob("*.safetensors"))) > 2
    hf_logits, _, _ = hf_loss_and_grads(model, tmp_path / "grads")
    ours = megalite_side(str(tmp_path / "model"), ["--micro-batch-size", str(BATCH)])
    torch.testing.assert_close(ours["logits"][..., :VOCAB], hf_logits, rtol=1e-5, atol=1e-5)
    assert main(["convert", "--from-hf", str(tmp_path / "model"), "--save", str(tmp_path / "ckpt")]) == 0
    printed = capsys.readouterr().out
    assert "--qk-layernorm" in printed and "--kv-channels 12" in printed and "--num-query-groups 2" in printed


def test_a_flag_that_contradicts_config_json_is_refused(tmp_path, world_of_one):
    from megalite.validation import ConfigError

    make_hf("llama", tmp_path / "model")
    ns = build_parser().parse_args(["--load", str(tmp_path / "model"), "--hidden-size", "64"])
    with pytest.raises(ConfigError, match=r"--hidden-size 64 \(the command line\) contradicts 32"):
        model_flags_from_hf(ns)


def test_rotary_scaling_is_refused_naming_the_field(tmp_path):
    from megalite.checkpoint.hf_config import model_fields
    from megalite.validation import ConfigError

    config = {"architectures": ["LlamaForCausalLM"], **COMMON, "vocab_size": VOCAB, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    with pytest.raises(ConfigError, match="rotary scaling 'llama3'"):
        model_fields(config)


def test_train_from_a_hugging_face_directory_and_export_the_result(tmp_path):
    """Through the command line: `megalite train --load HF_DIR` (flags from config.json, tokenizer from
    tokenizer.json) trains and saves; `megalite convert --to-hf` exports what transformers loads."""
    import subprocess
    import sys

    from tokenizers import Tokenizer, models

    make_hf("qwen2", tmp_path / "model")
    words = {f"w{i}": i for i in range(VOCAB - 1)} | {"<|endoftext|>": VOCAB - 1}
    Tokenizer(models.WordLevel(words, unk_token="w0")).save(str(tmp_path / "model" / "tokenizer.json"))
    run = subprocess.run([sys.executable, "-m", "megalite", "train", "--load", str(tmp_path / "model"), "--mock-data",
                          "--train-iters", "2", "--seq-length", "8", "--micro-batch-size", "2", "--log-interval", "1",
                          "--save", str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "model flags from" in run.stdout and "--add-qkv-bias" in run.stdout
    assert "vocabulary: 100 tokens, padded to 128" in run.stdout and run.stdout.count("| loss ") == 2
    export_hf(tmp_path / "ckpt", tmp_path / "export")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert again.config.vocab_size == VOCAB and again.model.layers[0].self_attn.q_proj.bias is not None
