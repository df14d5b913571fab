"""Building models offline: a BPE tokenizer with a chat template, random-weight models for
tests, and the trained built-in target + draft pair (`slos-serve model make`, `models.builtin`).

Everything is seeded and runs a fixed number of steps, so the same machine builds the same
model. The draft is distilled from the target's predictions, which is what makes it agree
with the target often enough for speculative decoding to pay.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from models.corpus import Conversation, stdlib_docstrings, training_conversations

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

Progress = Callable[[str, int, int, dict[str, float]], None]


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int = 2048

    def config(self, tokenizer: PreTrainedTokenizerFast, init_std: float = 0.02) -> LlamaConfig:
        return LlamaConfig(
            initializer_range=init_std,
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.max_positions,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )


TEST_SHAPE = Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, max_positions=512)
TARGET_SHAPE = Shape(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vocab=4096)
DRAFT_SHAPE = Shape(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=384, vocab=4096)
# a draft for a real target (`make_draft`), which gives it its vocabulary and context length
DRAFT_FOR_SHAPE = Shape(hidden=256, layers=2, heads=4, kv_heads=1, intermediate=768, vocab=0)


@dataclass(frozen=True)
class TrainPlan:
    """Fixed step counts keep the build deterministic (about 10 minutes on 2 cores)."""

    corpus_chars: int = 12_000_000
    seq_len: int = 128
    batch: int = 16
    target_steps: int = 1400
    draft_steps: int = 900
    lr: float = 3e-3
    seed: int = 0


# Distilling a draft for a real target (`make_draft`): the target's forward pass on every batch
# and the divergence over its whole vocabulary are most of the cost (about 3.5 s a step for
# SmolLM2-135M on 2 cores: 300 steps take about 18 minutes).
DRAFT_FOR_PLAN = TrainPlan(corpus_chars=2_000_000, batch=8, draft_steps=300)
DRAFT_HELD_OUT_TOKENS = 4096


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _flatten(conversations: list[Conversation]) -> list[str]:
    return [t["content"] for conv in conversations for t in conv]


def make_random(out_dir: Path, shape: Shape = TEST_SHAPE, seed: int = 0, *, init_std: float = 0.25,
                device: str = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """A random-weight model with a real tokenizer, in seconds: what tests run on. The wide
    initialisation makes its greedy output varied, so token-for-token checks mean something.
    A large shape (to time a GPU with) is built on `device`, where it initialises in seconds."""
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(list(stdlib_docstrings(400_000)), shape.vocab)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(shape.config(tokenizer, init_std=init_std)).to(dtype)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _token_stream(tokenizer: PreTrainedTokenizerFast, conversations: list[Conversation]) -> torch.Tensor:
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([t for seq in ids for t in seq], dtype=torch.long)


def _batches(stream: torch.Tensor, plan: TrainPlan, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - plan.seq_len - 1, (plan.batch,), generator=gen)
    return torch.stack([stream[s : s + plan.seq_len + 1] for s in starts.tolist()])


def _lr(step: int, total: int, peak: float) -> float:
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))))


def _train(
    name: str,
    model: LlamaForCausalLM,
    stream: torch.Tensor,
    plan: TrainPlan,
    steps: int,
    progress: Progress,
    teacher: LlamaForCausalLM | None = None,
) -> None:
    """Next-token training, or distillation from `teacher`'s distribution when one is given."""
    gen = torch.Generator().manual_seed(plan.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, plan.lr)
        batch = _batches(stream, plan, gen)
        logits = model(batch[:, :-1]).logits.float()
        if teacher is None:
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        else:
            with torch.no_grad():
                target = F.log_softmax(teacher(batch[:, :-1]).logits.float(), dim=-1)
            loss = F.kl_div(F.log_softmax(logits, -1), target, log_target=True, reduction="batchmean")
            loss = loss / plan.seq_len
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        progress(name, step + 1, steps, {"loss": loss.item()})
    model.eval()


@torch.no_grad()
def evaluate(
    target: LlamaForCausalLM, draft: LlamaForCausalLM, held_out: torch.Tensor, seq_len: int
) -> dict[str, float]:
    """Held-out loss and next-token accuracy of the target, and how often the draft's greedy
    choice equals the target's (the acceptance rate of one speculative token)."""
    n = (len(held_out) - 1) // seq_len
    x = held_out[: n * seq_len].view(n, seq_len)
    y = held_out[1 : n * seq_len + 1].view(n, seq_len)
    t_logits = target(x).logits.float()
    d_logits = draft(x).logits.float()
    return {
        "target_loss": F.cross_entropy(t_logits.flatten(0, 1), y.flatten()).item(),
        "target_accuracy": (t_logits.argmax(-1) == y).float().mean().item(),
        "draft_loss": F.cross_entropy(d_logits.flatten(0, 1), y.flatten()).item(),
        "draft_agreement": (d_logits.argmax(-1) == t_logits.argmax(-1)).float().mean().item(),
        "held_out_tokens": float(y.numel()),
    }


def make_builtin(out_dir: Path, progress: Progress, plan: TrainPlan = TrainPlan()) -> dict[str, float]:
    """Train the built-in pair into out_dir/target and out_dir/draft; returns the metrics."""
    started = time.monotonic()
    torch.manual_seed(plan.seed)
    conversations = training_conversations(plan.corpus_chars)
    split = max(1, len(conversations) // 50)
    train_convs, held_convs = conversations[split:], conversations[:split]
    tokenizer = train_tokenizer(_flatten(train_convs), TARGET_SHAPE.vocab)
    stream = _token_stream(tokenizer, train_convs)
    held_out = _token_stream(tokenizer, held_convs)[:20_000]

    target = LlamaForCausalLM(TARGET_SHAPE.config(tokenizer))
    _train("target", target, stream, plan, plan.target_steps, progress)
    draft = LlamaForCausalLM(DRAFT_SHAPE.config(tokenizer))
    _train("draft", draft, stream, plan, plan.draft_steps, progress, teacher=target)

    metrics = evaluate(target, draft, held_out, plan.seq_len)
    metrics["train_tokens"] = float(len(stream))
    metrics["build_seconds"] = time.monotonic() - started
    for name, model in (("target", target), ("draft", draft)):
        model.save_pretrained(Path(out_dir) / name)
        tokenizer.save_pretrained(Path(out_dir) / name)
    (Path(out_dir) / "build.json").write_text(
        json.dumps({"metrics": metrics, "plan": asdict(plan),
                    "target": asdict(TARGET_SHAPE), "draft": asdict(DRAFT_SHAPE)}, indent=2)
    )
    return metrics


def make_draft(target_dir: Path, out_dir: Path, progress: Progress, plan: TrainPlan = DRAFT_FOR_PLAN,
               shape: Shape = DRAFT_FOR_SHAPE) -> dict[str, float]:
    """Distil a small draft from the target in `target_dir` (its tokenizer and vocabulary, its
    distribution as the teacher's) into `out_dir`; returns the held-out metrics, above all how
    often the draft's greedy token is the target's."""
    from transformers import AutoTokenizer

    started = time.monotonic()
    torch.manual_seed(plan.seed)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    conversations = training_conversations(plan.corpus_chars)
    split = max(1, len(conversations) // 50)
    stream = _token_stream(tokenizer, conversations[split:])
    held_out = _token_stream(tokenizer, conversations[:split])[:DRAFT_HELD_OUT_TOKENS]
    shape = replace(shape, vocab=target.config.vocab_size, max_positions=target.config.max_position_embeddings)
    draft = LlamaForCausalLM(shape.config(tokenizer))
    _train("draft", draft, stream, plan, plan.draft_steps, progress, teacher=target)
    metrics = evaluate(target, draft, held_out, plan.seq_len)
    metrics["train_tokens"] = float(plan.draft_steps * plan.batch * plan.seq_len)
    metrics["build_seconds"] = time.monotonic() - started
    draft.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (Path(out_dir) / "build.json").write_text(json.dumps({"metrics": metrics, "plan": asdict(plan),
                                                           "target": str(target_dir), "shape": asdict(shape)},
                                                          indent=2))
    return metrics

