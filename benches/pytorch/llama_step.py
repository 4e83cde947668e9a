"""PyTorch + PEFT reference for the SmolLM2 training-step benchmark
(benches/benches/llama.rs, `cargo xtask bench --only llama`).

Same work: SmolLM2-135M-Instruct from its GGUF (float32, dequantised by transformers),
LoRA r=8 (alpha 16) on q_proj/v_proj, dropout off, batch 8 x 48 random tokens, the
logits of the label words " terrible" and " great" at the last position from the frozen
LM head, cross-entropy, backward, AdamW; 2 threads, eager attention. Prints the median
step and tokens/s, and the same machine's torch sgemm rate.

    python benches/pytorch/llama_step.py --gguf "$(cargo xtask assets --model smollm2 --print-path)"
"""

import argparse
import os
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--gguf", required=True)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--reps", type=int, default=5)
args = p.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)

folder, name = os.path.split(os.path.abspath(args.gguf))
base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager")
model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
model.eval()  # dropout off, as in the Rust step
opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
B, T = 8, 48
LABELS = [13321, 1109]
ids = torch.randint(1000, 49000, (B, T))
labels = torch.randint(0, 2, (B,))


def step():
    # Hidden states, then the LM head on the last position's label rows only: what
    # the Rust side computes (a full-vocabulary head would be 49,152 columns of work).
    h = model.base_model.model.model(input_ids=ids).last_hidden_state[:, -1]
    logits = h @ base.lm_head.weight[LABELS].T
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    opt.step()
    opt.zero_grad()


step()
times = []
for _ in range(args.reps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
med = statistics.median(times)
n = 2048
a, b = torch.randn(n, n), torch.randn(n, n)
best = min((lambda: (time.perf_counter(), a @ b, time.perf_counter()))() for _ in range(5))
sg = 2 * n**3 / (best[2] - best[0]) / 1e9
print(f"torch {torch.__version__}, {args.threads} threads; sgemm 2048^3: {sg:.1f} GFLOP/s")
print(f"| PyTorch + PEFT, LoRA r=8 q_proj,v_proj | {med * 1e3:.0f} ms | {B * T / med:.0f} tokens/s |")
