"""The GPU path on a CUDA device: our decoder against transformers on the real SmolLM2 in bf16 (logits, greedy
tokens), a compiled training step against an eager one, train.py end to end for two optimizer steps (the demo
mixture, and SmolLM2 on real rows), and the evaluator's greedy outputs on CUDA against the CPU's. Marked `gpu` and
skipped without CUDA; bench/gpu.sh runs them and puts what they measured into its gpu.json.

    MSFT_SMOLLM2=DIR MSFT_SHARED_DATA=DIR python -m pytest -m gpu tests/test_gpu.py -v
    MSFT_TEST_DEVICE=cpu python -m pytest -m gpu tests/test_gpu.py -v    # the same checks on the CPU: tests the tests

Tolerances. bf16 keeps 8 significant bits, so each rounding moves a value by up to 2^-9 of itself, and 30 layers of
them add up to an error that depends on the model and the input; a fixed bound would be a guess. So every bf16
result is judged against an fp32 run of the same computation: our bf16 logits must be as close to our fp32 logits
as transformers' bf16 logits are (within 1.5x), a compiled bf16 training run may move the loss from the eager bf16
run by at most twice what bf16 itself moves it from fp32 (or one bf16 step of the loss, 2^-8 of it, if larger), and
greedy tokens may part only where the fp32 model's logits for the two tokens differ by less than twice transformers'
bf16 error there (its largest over the vocabulary; ours is not used, so a wrong decoder cannot widen its tolerance).
The evaluator is compared in fp32 on both devices: the same function up to float32 rounding, so its greedy outputs
must be identical (in bf16, CPU and CUDA kernels round differently and near-ties could part for no fault of ours).
"""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
from conftest import generate
from demo import DEMO_ARGS, demo_checkpoint, make_demo
from model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("MSFT_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    DEVICE.startswith("cuda") and not torch.cuda.is_available(),
    reason="no CUDA device visible to torch: these tests check the GPU path (MSFT_TEST_DEVICE=cpu runs them here)")]
# a hung subprocess fails its test on the GPU; on the CPU (checking the tests themselves) the SmolLM2 run takes ~10 min
TIMEOUT = 300 if DEVICE.startswith("cuda") else 3600
PROMPTS = ["The capital of Germany is Berlin. The capital of Italy is",
           "Q: What is 12 plus 30?\nA:",
           "def fibonacci(n):",
           "Q: Which gas do plants take in from the air?\noptions: A. oxygen, B. carbon dioxide, C. helium\nA:"]


def record(test: str, **values):
    """What a test measured: printed (-s, -rA), and appended to MSFT_GPU_RECORD (JSON lines) for bench/gpu.sh."""
    print(test, json.dumps(values))
    if os.environ.get("MSFT_GPU_RECORD"):
        with open(os.environ["MSFT_GPU_RECORD"], "a") as f:
            f.write(json.dumps({"test": test, **values}) + "\n")


def rel_err(x, ref) -> float:
    return ((x.float() - ref).norm() / ref.norm()).item()


# -----------------------------------------------------------------------------
# the decoder against transformers, bf16, on the real checkpoint


@pytest.fixture(scope="module")
def smol(smollm2):
    """(tokenizer, our fp32 reference, ours in bf16, transformers in bf16 with sdpa), all on DEVICE."""
    torch.set_float32_matmul_precision("highest")  # the reference is plain fp32 (no TF32)
    tok, _ = data.load_tokenizer(smollm2)
    ref = Transformer.from_pretrained(smollm2, device=DEVICE).eval()
    ours = Transformer.from_pretrained(smollm2, device=DEVICE, dtype=torch.bfloat16).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16, attn_implementation="sdpa")
    return tok, ref, ours, hf.to(DEVICE).eval()


@torch.no_grad()
def test_smollm2_bf16_logits_as_close_to_fp32_as_transformers(smol):
    tok, ref, ours, hf = smol
    for prompt in PROMPTS:
        idx = torch.tensor([tok.encode(prompt).ids], device=DEVICE)  # (1, T)
        r = ref(idx)
        o, h = ours(idx), hf(idx).logits
        e_ours, e_hf = rel_err(o, r), rel_err(h, r)
        record("bf16_logits", prompt=prompt[:30], tokens=idx.size(1), rel_err_ours=e_ours, rel_err_transformers=e_hf,
               max_abs_ours_vs_transformers=(o.float() - h.float()).abs().max().item(),
               top1_agree_ours=(o.argmax(-1) == r.argmax(-1)).float().mean().item(),
               top1_agree_transformers=(h.argmax(-1) == r.argmax(-1)).float().mean().item())
        assert e_ours <= 1.5 * e_hf + 1e-3, f"{prompt!r}: ours {e_ours:.2e} vs transformers {e_hf:.2e} from fp32"
        # 2.6e-2 measured on the CPU: a tenth is no longer rounding, whatever transformers does
        assert e_ours < 0.1, f"{prompt!r}: bf16 logits {e_ours:.2e} from fp32 (relative): more than rounding"


@torch.no_grad()
def test_smollm2_bf16_greedy_tokens_match_transformers(smol):
    tok, ref, ours, hf = smol
    hf.generation_config.eos_token_id = None  # decode all 32 tokens, through EOS, as ours does
    for prompt in PROMPTS[:3]:
        idx = torch.tensor([tok.encode(prompt).ids], device=DEVICE)
        got = generate(ours, idx, 32)[0, idx.size(1):].tolist()
        want = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=32, do_sample=False,
                           pad_token_id=0)[0, idx.size(1):].tolist()
        n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(got))
        gap = noise = None
        if n < len(got):  # where they part, the fp32 model must be (nearly) undecided between the two tokens
            ctx = torch.tensor([idx[0].tolist() + got[:n]], device=DEVICE)
            r = ref(ctx)[0, -1]  # (vocab,)
            gap = (r[got[n]] - r[want[n]]).abs().item()
            noise = (hf(ctx).logits[0, -1].float() - r).abs().max().item()
        record("bf16_greedy", prompt=prompt[:30], same_tokens=n, of=len(got), fp32_gap=gap, bf16_noise=noise)
        assert n == len(got) or gap <= 2 * noise, (
            f"{prompt!r}: greedy tokens part at {n} where fp32's logits for the two tokens differ by {gap:.3f}, "
            f"more than twice transformers' bf16 error {noise:.3f}: {tok.decode(got)!r} vs {tok.decode(want)!r}")


# -----------------------------------------------------------------------------
# compiled against eager training


def test_compiled_training_step_matches_eager():
    """5 steps of bf16 autocast + fused AdamW on a fixed batch, compiled and eager, against fp32 eager."""
    cfg = ModelConfig(model_type="qwen2", vocab_size=4096, dim=256, n_layers=4, n_heads=4, n_kv_heads=2,
                      head_dim=64, hidden_dim=704, norm_eps=1e-6, max_seq_len=512, qkv_bias=True,
                      tie_embeddings=True)
    torch.manual_seed(0)
    base = Transformer(cfg)
    batch = torch.randint(cfg.vocab_size, (8, 129), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    idx, targets = batch[:, :-1], batch[:, 1:]  # (8, 128) each

    def losses(compiled: bool, bf16: bool) -> list[float]:
        model = copy.deepcopy(base).to(DEVICE).train()  # same initial weights each time (the tie survives)
        fwd = torch.compile(model) if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
        out = []
        for _ in range(5):
            with torch.autocast(DEVICE.split(":")[0], torch.bfloat16, enabled=bf16):
                logits = fwd(idx)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())  # as train.py
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(loss.item())
        return out

    fp32, eager, compiled = losses(False, False), losses(False, True), losses(True, True)
    bf16_shift = max(abs(a - b) for a, b in zip(eager, fp32))
    tol = max(2 * bf16_shift, 2**-8 * max(eager))
    gap = max(abs(a - b) for a, b in zip(compiled, eager))
    record("compiled_training", fp32=fp32, eager_bf16=eager, compiled_bf16=compiled, tolerance=tol, gap=gap)
    assert eager[-1] < eager[0] - 0.1, f"the loss should fall over 5 steps on one batch: {eager}"
    assert gap <= tol, f"compiled {compiled} vs eager {eager}: {gap:.4f} > {tol:.4f} (fp32: {fp32})"


# -----------------------------------------------------------------------------
# train.py end to end, and the evaluator against the CPU


def run(cmd: list, timeout: float) -> str:
    cmd = [str(c) for c in cmd]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def check_two_steps(out: Path, stdout: str, name: str):
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [e for e in log if e["event"] == "train"]
    summary = json.loads((out / "summary.json").read_text())
    record(name, losses=[e["loss"] for e in steps], tok_per_s=[round(e["tok_per_s"]) for e in steps],
           evals=sum(e["event"] == "eval" for e in log), test_scores=summary["test_scores"],
           wall_time_s=summary["wall_time_s"])
    assert len(steps) == 2 and summary["steps"] == 2, [e["event"] for e in log]
    assert all(math.isfinite(e["loss"]) for e in steps)
    assert any(e["event"] == "eval" for e in log) and log[-1]["event"] == "final"
    assert f"device {DEVICE}" in stdout, stdout[-2000:]
    assert (out / "model" / "model.safetensors").is_file()


def test_train_py_demo_two_steps(tmp_path):
    """The demo's model, mixture and flags, compiled with bf16 autocast where that is train.py's default (CUDA)."""
    folder = make_demo(tmp_path / "data")
    ckpt = demo_checkpoint(folder)
    sizes = json.loads((folder / "manifest.json").read_text())["tasks"]
    n_train = sum(t["sizes"]["train"] for t in sizes.values())
    flags = {**DEMO_ARGS, "max_epochs": (2 * DEMO_ARGS["batch_size"] - 0.5) / n_train}  # 2 steps
    flags["interval"] = flags["max_epochs"]
    stdout = run([sys.executable, "train.py", "--method", "sft", "--model", ckpt, "--data", folder, "--out",
                  tmp_path / "run", "--device", DEVICE.split(":")[0]]
                 + [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", v)], timeout=TIMEOUT)
    check_two_steps(tmp_path / "run", stdout, "train_py_demo")
    if DEVICE.startswith("cuda"):
        assert "compile True" in stdout


def test_train_py_smollm2_two_steps(tmp_path, smollm2, shared_data):
    """SmolLM2 on 32 real rows, batch 16: 2 steps, evaluated with generation under bf16 autocast. Eager: compiling
    30 layers twice (a second shape) costs a minute here, and the compiled path is what the demo run and
    test_compiled_training_step_matches_eager check."""
    run([sys.executable, "data.py", "prepare", "--source", shared_data, "--out", tmp_path / "mix", "--tasks",
         "openbookqa", "gsm8k", "--train", "16", "--selection", "8", "--test", "8"], timeout=120)
    micro = 16 if DEVICE.startswith("cuda") else 4  # 16 rows of gsm8k take 15 GB on the CPU
    stdout = run([sys.executable, "train.py", "--method", "sft", "--model", smollm2, "--data", tmp_path / "mix",
                  "--out", tmp_path / "run", "--device", DEVICE.split(":")[0], "--batch-size", "16", "--micro-batch",
                  micro, "--max-epochs", "1", "--interval", "1", "--eval-limit", "8", "--max-new-tokens", "32",
                  "--no-compile"], timeout=TIMEOUT)
    check_two_steps(tmp_path / "run", stdout, "train_py_smollm2")


def test_evaluator_greedy_outputs_on_device_match_cpu(smollm2, shared_data):
    """20 openbookqa questions, 5-shot, fp32 on both (see the docstring), through bench_eval's calls of evaluate.py."""
    from bench.bench_eval import load_prompts, run_ours
    torch.set_float32_matmul_precision("highest")
    tok, eos = data.load_tokenizer(smollm2)
    asked, keys, ids = load_prompts(shared_data, "openbookqa", 20, 5, tok)
    outputs = []
    for device in (DEVICE, "cpu"):
        model = Transformer.from_pretrained(smollm2, device=device).eval()
        gens, _ = run_ours(model, tok, eos, ids, keys, list(range(len(asked))), max_new_tokens=32, batch_size=8)
        outputs.append(gens)
    same = sum(a == b for a, b in zip(*outputs))
    record("evaluator_vs_cpu", questions=len(asked), same=same, generated=sum(map(len, outputs[0])))
    assert same == len(asked) == 20, [(tok.decode(a), tok.decode(b)) for a, b in zip(*outputs) if a != b][:3]
