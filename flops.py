"""FLOPs of a fine-tuning run (the paper's Appendix F; docs/baselines.md), counted from the tokens actually processed.

    python -m pytest -q tests/test_flops.py         # hand counts; train.py reports counter.report() in summary.json

    counter = flops.FlopCounter(n_params)   # N: the parameters a forward pass uses (tied embeddings counted once)
    counter.train(tokens)                   # forward + backward over `tokens` tokens: 6 N per token
    counter.eval(tokens)                    # forward-only evaluation, prompt + generated tokens: 2 N per token
    counter.add("paper_eval", tokens)       # the same evaluation as Appendix F counts it (prompts whole)
    counter.forward(tokens)                 # forward-only pass while training (IES: the skipped examples' losses)
    counter.lookahead(tokens)               # DynamixSFT's one-step look-ahead: 8 N per token
    counter.report()                        # {"train", "eval", "total"} FLOPs; forward and lookahead are training

Methods differ only in which tokens they process, and train.py counts exactly those:
- SFT, continual SFT, mSFT: train() for every optimizer step, eval() for every evaluation. A roll-back costs nothing
  (parameters only); with eval_excluded="rollback" the excluded tasks cost one evaluation per stage (Appendix F).
- SRO and Soft SRO SFT: the search run and the training run go through one counter, so the search phase counts.
- IES: train() for the examples backpropagated, forward() for the skipped ones whose loss is still recorded (2 N).
- DynamixSFT: lookahead() for each look-ahead batch (2 N forward before the update, 4 N backward, 2 N forward after),
  train() for the ordinary steps.

6 N D is Kaplan et al. (2020)'s rule: it leaves out attention over the context. forward_flops_per_token() is the finer
count of Chinchilla (Hoffmann et al. 2022, Appendix F) for comparison: every matmul weight, the logits included, plus
the attention scores and values.
"""
import numbers

FLOPS_PER_PARAM_TOKEN = {"train": 6, "forward": 2, "lookahead": 8, "eval": 2, "test": 2, "paper_eval": 2,
                         "paper_test": 2}
TRAINING = ("train", "forward", "lookahead")  # report()["train"]; "eval" is the method's evaluation, "test" the report


def param_count(cfg) -> dict[str, int]:
    """{"total", "non_embedding"} parameters of a model.ModelConfig (any object with its fields): total as the model
    holds them (tied embeddings once); non_embedding (Kaplan's N) without the input embedding and an untied lm_head."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    attn = cfg.dim * (q + 2 * kv) + q * cfg.dim + (q + 2 * kv if cfg.qkv_bias else 0)
    qk_norm = {"none": 0, "head": 2 * cfg.head_dim, "all": q + kv}[cfg.qk_norm]  # per head (Qwen3) or all (OLMo 2)
    layer = attn + qk_norm + 3 * cfg.dim * cfg.hidden_dim + 2 * cfg.dim  # + SwiGLU MLP + two RMSNorm weights
    non_embedding = cfg.n_layers * layer + cfg.dim  # + the final norm
    return {"total": non_embedding + cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2),
            "non_embedding": non_embedding}


def forward_flops_per_token(cfg, context: float) -> float:
    """Forward FLOPs for one token attending to `context` positions (x3 for training), Chinchilla's convention:
    2 x every matmul weight (q, k, v, o, the MLP's gate/up/down, and the logits' vocab x dim, tied or not), plus
    2 x 2 x context x n_heads x head_dim per layer for the attention scores (QK^T) and the weighted values (AV).
    Left out: the embedding lookup, norms, biases, rotary, softmax, activations, residual adds. Chinchilla passes the
    sequence length as context (as a kernel that computes the whole square does); (T + 1) / 2 is the exact causal
    average over a sequence of T tokens."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    matmul = cfg.n_layers * (cfg.dim * (q + 2 * kv) + q * cfg.dim + 3 * cfg.dim * cfg.hidden_dim)
    return 2 * (matmul + cfg.vocab_size * cfg.dim) + 2 * 2 * cfg.n_layers * context * q


class FlopCounter:
    """Running token totals of one run, by kind, and their FLOPs (FLOPS_PER_PARAM_TOKEN x N x tokens)."""

    def __init__(self, n_params: int):
        if not isinstance(n_params, int) or n_params <= 0:
            raise ValueError(f"n_params must be a positive integer, got {n_params!r}")
        self.n_params = n_params
        self.tokens = {kind: 0 for kind in FLOPS_PER_PARAM_TOKEN}
        self.paper_last, self.excluded = {}, []  # Appendix F's count: each task's latest evaluation, mSFT's excluded

    def add(self, kind: str, tokens):
        # token counts arrive as floats after an all-reduce: accept whole numbers only
        if not isinstance(tokens, numbers.Real) or not tokens >= 0 or not float(tokens).is_integer():
            raise ValueError(f"{kind} tokens must be a whole number >= 0, got {tokens!r}")
        self.tokens[kind] += int(tokens)

    def train(self, tokens):
        self.add("train", tokens)

    def forward(self, tokens):
        self.add("forward", tokens)

    def lookahead(self, tokens):
        self.add("lookahead", tokens)

    def eval(self, tokens):
        self.add("eval", tokens)

    def count_paper(self, event: dict, evaluated: dict, stage_wise: bool):
        """Every logged event goes through here. An eval event gets its cost both ways (`evaluated`: evaluate.py's
        results): eval_tokens, as run, and paper_tokens, each task's prompts whole. Appendix F counts every task
        evaluated at every checkpoint, except for mSFT (stage_wise): its active tasks at every checkpoint and the
        excluded ones once a stage. A method's last decision (with "flops") gets the report so far."""
        if event["event"] == "eval":
            event["eval_tokens"] = sum(r["tokens"] for r in evaluated.values())
            event["paper_tokens"] = {t: r["paper_tokens"] for t, r in evaluated.items()}
            self.paper_last.update(event["paper_tokens"])
            counted = event["active"] if stage_wise else event["evaluated"]
            self.add("paper_eval", sum(event["paper_tokens"].get(t, 0) for t in counted))
        elif stage_wise and event["event"] == "decision" and event["kind"] in ("drop", "no_drop"):
            # the tasks excluded before this stage, validated once at its roll-back checkpoint (V(E_k)); the one it
            # excludes now was active, and counted at each of its checkpoints
            self.add("paper_eval", sum(self.paper_last[t] for t in self.excluded))
            self.excluded += event["excluded"]
        if "flops" in event:
            event["flops"], event["flop_tokens"] = self.report(), dict(self.tokens)

    def report(self) -> dict[str, int]:
        """{"train", "eval", "total"}: the method's cost in the tokens actually run (our evaluator computes a shared
        few-shot prefix once); "paper_eval", "paper_total": Appendix F's count of the same run (every evaluated
        prompt whole, with its generated tokens; mSFT's excluded tasks once a stage); "test", "paper_test": the final
        report on the test split, never in a total (the paper counts what choosing the model costs)."""
        f = {kind: FLOPS_PER_PARAM_TOKEN[kind] * self.n_params * n for kind, n in self.tokens.items()}
        train = sum(f[kind] for kind in TRAINING)
        return {"train": train, "eval": f["eval"], "total": train + f["eval"], "test": f["test"],
                "paper_eval": f["paper_eval"], "paper_total": train + f["paper_eval"], "paper_test": f["paper_test"],
                "forward": f["forward"], "lookahead": f["lookahead"]}  # both part of "train": IES's, DynamixSFT's

    def state_dict(self) -> dict:
        return {"n_params": self.n_params, "tokens": dict(self.tokens), "paper_last": dict(self.paper_last),
                "excluded": list(self.excluded)}

    def load_state_dict(self, d: dict):
        if not isinstance(d, dict) or d.get("n_params") != self.n_params or \
                not isinstance(d.get("tokens"), dict) or set(d["tokens"]) != set(self.tokens):
            raise ValueError(f"not the FLOP counter of a model with {self.n_params} parameters: {d!r:.200}")
        for kind, n in d["tokens"].items():
            self.tokens[kind] = 0
            self.add(kind, n)
        self.paper_last, self.excluded = dict(d.get("paper_last", {})), list(d.get("excluded", []))
