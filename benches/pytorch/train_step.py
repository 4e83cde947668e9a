"""PyTorch + PEFT reference for the CPU training-step benchmark (ANCHORS.md, "CPU").

Same work as `cargo xtask bench`: all-MiniLM-L6-v2, LoRA r=8 (alpha 16) on
query/value, linear head on the attention-masked mean of the last hidden state,
batch 16 x 64 tokens, forward + backward (+ AdamW step, reported separately),
2 threads. Prints tokens/s and the same machine's torch sgemm rate, so the Rust
numbers can be compared as ratios measured in one session.

    python benches/pytorch/train_step.py --model-dir "$(cargo xtask assets --print-path)"
"""

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import BertModel

p = argparse.ArgumentParser()
p.add_argument("--model-dir", required=True)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--reps", type=int, default=10)
p.add_argument("--targets", default="query,value")
args = p.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)


class MeanPool(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert
        self.classifier = torch.nn.Linear(bert.config.hidden_size, 2)

    def forward(self, ids, mask):
        h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.classifier((h * m).sum(1) / m.sum(1))


bert = BertModel.from_pretrained(args.model_dir, add_pooling_layer=False, dtype=torch.float32, attn_implementation="eager")
model = get_peft_model(
    MeanPool(bert),
    LoraConfig(r=8, lora_alpha=16, target_modules=args.targets.split(","), lora_dropout=0.0, modules_to_save=["classifier"]),
)
model.eval()  # dropout off, as in the Rust step
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
B, T = 16, 64
ids = torch.randint(1000, bert.config.vocab_size, (B, T))
mask = torch.ones(B, T, dtype=torch.long)
labels = torch.randint(0, 2, (B,))


def step(with_opt):
    logits = model(ids, mask)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    if with_opt:
        opt.step()
    opt.zero_grad(set_to_none=True)


def median(fn):
    fn()
    ts = []
    for _ in range(args.reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


fb = median(lambda: step(False))
fbo = median(lambda: step(True))
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
sg = min(median(lambda: a @ b) for _ in range(2))
print(f"torch {torch.__version__}, {args.threads} threads, targets {args.targets}")
print(f"torch sgemm 2048^3: {2 * 2048**3 / sg / 1e9:.1f} GFLOP/s")
print(f"forward+backward: {fb * 1e3:.1f} ms = {B * T / fb:.0f} tokens/s")
print(f"forward+backward+AdamW: {fbo * 1e3:.1f} ms = {B * T / fbo:.0f} tokens/s")
