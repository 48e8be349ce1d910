"""LoRA adapters in and out as PEFT folders (``gatedpo_mega/convert/peft.py``), and merged into their base.

One short LoRA run at TP 2 from a tiny Hugging Face Llama (targets q, v, o, up, down: some parts of the fused
q/k/v and gate/up layers only) serves every check: the exported adapter has PEFT's own names and shapes, loads into
``peft.PeftModel`` with megatron-core's logits, and merges as ``merge_and_unload`` does; read back at TP 2 it is
the file, bit for bit; a run started from it has the starting policy as its reference (loss ln 2) and, after a step
that moves no weight, exports the same file again. Every refusal is one line naming the file and field.
"""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from convert_helpers import TOKENS, make_hf_folder, stage_logits
from distributed import gatedpo, here, run_distributed
from safetensors.torch import load_file, save_file

from gatedpo_mega.config import load_config
from gatedpo_mega.convert import ConvertError, zero_to_hf
from gatedpo_mega.convert.peft import check_adapter, read_adapter_config
from gatedpo_mega.errors import UserError
from gatedpo_mega.training.preflight import load_run_config

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.slow,
    pytest.mark.filterwarnings(
        "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
    ),  # PEFT's call
]

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
LORA = ["model.lora.rank=4", "model.lora.alpha=8", f"model.lora.target_modules={','.join(TARGETS)}"]
RUN = [
    "parallel.tensor=2", "train.micro_batch_size=2", "train.global_batch_size=4", "train.warmup_steps=0",
    "data.builtin_pairs=32", "data.max_length=48", "data.max_prompt_length=32", "data.eval_fraction=0",
    "train.report_to=none",
]  # fmt: skip
# Hugging Face module of each megatron-core linear (written out here, not taken from the package)
PREFIX = {"linear_qkv": "self_attn", "linear_proj": "self_attn", "linear_fc1": "mlp", "linear_fc2": "mlp"}


def _peft_name(global_name: str) -> str:
    """``decoder.layers.{i}.{part}.{linear}.lora.{A|B}.{hf}`` -> PEFT's tensor name."""
    parts = global_name.split(".")
    layer, linear, factor, hf = parts[2], parts[4], parts[6], parts[7]
    return f"base_model.model.model.layers.{layer}.{PREFIX[linear]}.{hf}.lora_{factor}.weight"


def lora_worker(rank: int, world: int, ckpt: str, hf_dir: str, adapter_dir: str, out: str) -> None:
    """At TP 2: the trained policy (base from ``hf_dir``, adapters from DeepSpeed's own model-states files, not
    through the converter): its logits; then the adapters zeroed and read from ``adapter_dir`` by
    ``load_peft_adapter``: its logits again and every factor gathered whole. And the seeded initialisation redrawn
    by ``seeded_weights`` is the one ``build_model`` draws."""
    import torch.distributed as dist

    from gatedpo_mega.convert import hf_to_mcore_state
    from gatedpo_mega.convert.folders import HFFolder
    from gatedpo_mega.convert.hf_config import model_config_from_dict
    from gatedpo_mega.convert.lora_checkpoint import seeded_weights
    from gatedpo_mega.convert.peft import load_peft_adapter
    from gatedpo_mega.formats import module_states_file
    from gatedpo_mega.megatron.lora import add_adapters
    from gatedpo_mega.megatron.model import StageInfo, build_model
    from gatedpo_mega.megatron.parallel import initialize_layout

    meta = json.loads((Path(ckpt) / "meta.json").read_text())
    vocab, tp = meta["vocab_size"], meta["layout"]["tensor"]
    lay = initialize_layout(tp, 1)
    cfg = model_config_from_dict({**meta["model"], "fused_logprobs": False}, ckpt)
    stage = StageInfo(pre_process=True, post_process=True, layer_offset=0, tp_rank=lay.tp_rank, tp_size=tp)
    model = build_model(cfg, vocab_size=vocab, stage=stage, pipeline=1, seed=5, tp_group=lay.tp_group)
    base = hf_to_mcore_state(HFFolder(hf_dir), cfg, vocab_size=vocab, tensor=tp, tp_rank=lay.tp_rank)
    model.load_state_dict(base, strict=False)
    add_adapters(
        model, cfg, layer_offset=0, tp_group=lay.tp_group, tp_rank=lay.tp_rank, tp_size=tp, seed=5
    )  # fmt: skip
    states = module_states_file(Path(ckpt), lay.tp_rank, meta["layout"]["zero_stage"])
    state = torch.load(states, weights_only=False)["module"]
    loaded = model.load_state_dict(state, strict=False)
    assert not loaded.unexpected_keys and not [k for k in loaded.missing_keys if ".lora." in k]
    trained = stage_logits(model, lay, rank, cfg.hidden_size, vocab)
    adapters = {n: p for n, p in model.named_parameters() if ".lora." in n}
    with torch.no_grad():
        for p in adapters.values():
            p.zero_()
    load_peft_adapter(model, model_config_from_dict({**meta["model"], "init_adapter": adapter_dir}, ckpt), 0,
                      lay.tp_rank, tp)  # fmt: skip
    reloaded = stage_logits(model, lay, rank, cfg.hidden_size, vocab)
    whole = {}
    for name, p in adapters.items():
        if getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(p) for _ in range(tp)]
            dist.all_gather(parts, p.detach().contiguous(), group=lay.tp_group)
            whole[name] = torch.cat(parts, dim=p.partition_dim)
        else:
            whole[name] = p.detach().clone()
    seeded_cfg = model_config_from_dict({**meta["model"], "init_from": "", "lora": {}}, ckpt)
    drawn = build_model(seeded_cfg, vocab_size=vocab, stage=stage, pipeline=1, seed=11, tp_group=lay.tp_group)
    redrawn = hf_to_mcore_state(
        seeded_weights(seeded_cfg, vocab, tensor=tp, seed=11), seeded_cfg, vocab_size=vocab, tensor=tp,
        tp_rank=lay.tp_rank,
    )  # fmt: skip
    for name, p in drawn.state_dict().items():
        if not name.endswith("_extra_state"):
            assert torch.equal(p, redrawn[name]), name
    if rank == 0:
        torch.save({"trained": trained, "reloaded": reloaded, "adapters": whole}, out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama folder, two LoRA steps at TP 2 from it, the merged and the PEFT export, and the worker's
    results."""
    root = tmp_path_factory.mktemp("lora-peft")
    hf_dir = make_hf_folder("llama", root, vocab_size=512)  # covers the built-in tokenizer's vocabulary
    run = root / "run"
    common = [*RUN, f"model.init_from={hf_dir}", f"data.cache_dir={root / 'cache'}"]
    r = gatedpo(2, "train", *common, *LORA, "train.max_steps=2", "train.lr=2e-2", f"train.output_dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    merged = zero_to_hf(run, root / "merged")
    adapter = zero_to_hf(run, root / "adapter", adapter_only=True)
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    out = root / "worker.pt"
    run_distributed(lora_worker, 2, str(ckpt), str(hf_dir), str(adapter), str(out))
    return {"root": root, "hf": hf_dir, "run": run, "merged": merged, "adapter": adapter, "common": common,
            "ckpt": ckpt, **torch.load(out)}  # fmt: skip


def _peft_model(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(trained["hf"], dtype=torch.float32)
    return PeftModel.from_pretrained(base, trained["adapter"]).eval()


def test_export_has_peft_names_shapes_and_config(trained):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    fresh = get_peft_model(
        AutoModelForCausalLM.from_pretrained(trained["hf"]),
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
    )
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(fresh).items()}
    written = load_file(trained["adapter"] / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in written.items()} == expected
    assert any(torch.count_nonzero(v) for k, v in written.items() if "lora_B" in k)  # trained: B moved from 0
    config = json.loads((trained["adapter"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8, TARGETS)
    assert config["base_model_name_or_path"] == str(trained["hf"])
    assert (trained["adapter"] / "tokenizer.json").is_file()  # the run's tokenizer rides along


def test_peft_model_gives_megatron_cores_logits_and_merges_as_exported(trained):
    model = _peft_model(trained)
    with torch.no_grad():
        logits = model(torch.tensor(TOKENS)).logits.float()
    torch.testing.assert_close(logits, trained["trained"], rtol=0, atol=1e-5)
    merged = model.merge_and_unload().state_dict()
    exported = {}
    for f in (trained["merged"]).glob("*.safetensors"):
        exported.update(load_file(f))
    assert set(exported) == set(merged)
    for name, w in exported.items():
        torch.testing.assert_close(w, merged[name], rtol=0, atol=1e-6, msg=name)


def test_load_peft_adapter_at_tp2_gives_the_file_back_bit_for_bit(trained):
    written = load_file(trained["adapter"] / "adapter_model.safetensors")
    back = {_peft_name(n): t for n, t in trained["adapters"].items()}
    assert back.keys() == written.keys()
    for name, t in written.items():
        assert torch.equal(back[name], t), name
    torch.testing.assert_close(trained["reloaded"], trained["trained"], rtol=0, atol=0)


def test_a_run_from_the_adapter_starts_at_ln2_and_exports_it_unchanged(trained):
    """model.init_adapter with no model.lora written (its config fills it): the reference is the starting policy,
    so step one's loss is ln 2; that step moves no weight (Adam's eps 1e10 makes each update far below half a unit
    in the last place of every factor), so its checkpoint exports the starting file again, bit for bit."""
    run = trained["root"] / "again"
    r = gatedpo(2, "train", *trained["common"], f"model.init_adapter={trained['adapter']}", "train.max_steps=1",
                "train.adam_eps=1e10", f"train.output_dir={run}")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1 and row["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    meta = json.loads(sorted((run / "checkpoints").glob("step-*"))[-1].joinpath("meta.json").read_text())
    assert meta["model"]["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": TARGETS}
    again = zero_to_hf(run, trained["root"] / "again-adapter", adapter_only=True)
    before = load_file(trained["adapter"] / "adapter_model.safetensors")
    after = load_file(again / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _with_base(trained, dst: Path, init_from: str) -> Path:
    """A copy of the run's checkpoint whose meta.json names another base."""
    shutil.copytree(trained["ckpt"], dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta["model"]["init_from"] = init_from
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


def test_the_merged_base_comes_from_an_mcore_folder_or_the_seed(trained, tmp_path):
    """The base is whatever the checkpoint's model.init_from names: an mcore folder of the same weights merges to
    the same folder, bit for bit; with none, the initialisation drawn from the run's train.seed (config.yaml)."""
    import yaml

    from gatedpo_mega.convert import hf_to_mcore
    from gatedpo_mega.convert.hf_config import model_config_from_dict
    from gatedpo_mega.convert.lora_checkpoint import seeded_weights

    mcore = hf_to_mcore(trained["hf"], tmp_path / "mcore", tensor=2, pipeline=1)
    out = zero_to_hf(_with_base(trained, tmp_path / "on-mcore", str(mcore)), tmp_path / "m")
    merged, again = _weights(trained["merged"]), _weights(out)
    assert merged.keys() == again.keys() and all(torch.equal(merged[k], again[k]) for k in merged)

    ckpt = _with_base(trained, tmp_path / "on-seed", "")
    out = zero_to_hf(ckpt, tmp_path / "s")
    meta = json.loads((ckpt / "meta.json").read_text())
    seed = yaml.safe_load((ckpt / "config.yaml").read_text())["train"]["seed"]
    base = seeded_weights(
        model_config_from_dict(meta["model"], "meta"), meta["vocab_size"], tensor=2, seed=seed
    )
    adapter = load_file(trained["adapter"] / "adapter_model.safetensors")
    adapted = 0
    for name, w in _weights(out).items():
        a = adapter.get(f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight")
        b = adapter.get(f"base_model.model.{name.removesuffix('.weight')}.lora_B.weight")
        if a is None:
            assert torch.equal(w, base[name]), name
        else:
            torch.testing.assert_close(w, base[name] + (b @ a) * 2.0, rtol=0, atol=1e-6)  # alpha 8 / rank 4
            adapted += 1
    assert adapted == 2 * len(TARGETS)


# ------------------------------------------------------------------------------------------------ refusals


def _copy(trained, tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(trained["adapter"], folder)
    return folder


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


CONFIG_REFUSALS = {
    "rslora": ({"use_rslora": True}, "use_rslora=true"),
    "dora": ({"use_dora": True}, "use_dora=true"),
    "bias": ({"bias": "all"}, 'bias="all"'),
    "fan_in_fan_out": ({"fan_in_fan_out": True}, "fan_in_fan_out=true"),
    "rank_pattern": ({"rank_pattern": {"q_proj": 8}}, "rank_pattern="),
    "lm_head": ({"target_modules": ["q_proj", "lm_head"]}, "'lm_head'"),
    "regex": ({"target_modules": ".*proj"}, "a regular expression"),
    "r": ({"r": 0}, "r=0"),
}


@pytest.mark.parametrize("case", CONFIG_REFUSALS)
def test_what_is_not_plain_lora_is_refused_naming_file_and_field(case, trained, tmp_path):
    changes, said = CONFIG_REFUSALS[case]
    folder = _copy(trained, tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(UserError) as e:
        read_adapter_config(folder)
    assert f"{folder / 'adapter_config.json'}" in str(e.value) and said in str(e.value)
    assert "\n" not in str(e.value)


def test_written_lora_fields_must_agree_and_config_alone_refuses_a_missing_rank(trained):
    adapter = f"model.init_adapter={trained['adapter']}"
    cfg, _ = load_run_config(None, [adapter])
    assert (cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.target_modules) == (4, 8.0, TARGETS)
    with pytest.raises(UserError, match=r"model\.lora\.rank 4 \(adapter_config\.json r\) vs 8 \(config\)"):
        load_run_config(None, [adapter, "model.lora.rank=8"])
    with pytest.raises(
        UserError, match=r"model\.lora\.target_modules q_proj,v_proj,o_proj,up_proj,down_proj .* vs "
    ):
        load_run_config(None, [adapter, "model.lora.target_modules=all-linear"])
    with pytest.raises(UserError, match=r"set model\.lora\.rank"):  # built without reading files
        load_config(None, [adapter])
    r = here("config", adapter, "model.lora.alpha=16")  # the command: one line, exit 2
    assert (
        r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "lora_alpha) vs 16 (config)" in r.stderr
    )


def test_missing_files_and_tensors_are_refused_before_any_process_starts(trained, tmp_path):
    folder = _copy(trained, tmp_path)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    cfg, _ = load_run_config(None, [*trained["common"], f"model.init_adapter={folder}"])
    save_file({k: v for k, v in tensors.items() if k != name}, weights)
    with pytest.raises(UserError, match=re.escape(f"{weights}: tensor {name} is missing")):
        check_adapter(cfg.model)
    save_file({**tensors, name: tensors[name][:, :2].contiguous()}, weights)
    with pytest.raises(UserError, match=re.escape(f"tensor {name} has shape [64, 2], expected [64, 4]")):
        check_adapter(cfg.model)
    out = tmp_path / "run"  # through gatedpo train: refused in the launching process, no worker started
    r = here(
        "train", "--nproc", "2", *trained["common"], f"model.init_adapter={folder}", f"train.output_dir={out}"
    )
    assert r.returncode == 2 and f"{name} has shape" in r.stderr and not (out / "metrics.jsonl").exists()
    weights.unlink()
    with pytest.raises(UserError, match=re.escape(f"{weights} is missing")):
        check_adapter(cfg.model)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(UserError, match=re.escape(f"{folder / 'adapter_config.json'} is missing")):
        load_run_config(None, [f"model.init_adapter={folder}"])


def test_adapter_only_is_refused_for_a_checkpoint_without_lora(trained, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained["ckpt"], ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["model"]["lora"]["rank"] = 0
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConvertError, match="is not a LoRA run's checkpoint"):
        zero_to_hf(ckpt, tmp_path / "x", adapter_only=True)
    r = here("convert", "zero-to-hf", "--src", str(ckpt), "--dst", str(tmp_path / "x"), "--adapter-only")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and not (tmp_path / "x").exists()
