#!/usr/bin/env python3
"""Writes the small committed fixtures the runtime's tests compare against (run by hand, never
in CI; needs torch, transformers, sentence-transformers and safetensors from PyPI, e.g. in a
venv outside the repo):

    python3 scripts/make_fixtures.py [--minilm models/all-MiniLM-L6-v2]

tests/fixtures/tiny-bert/           a random 2-layer BERT (config.json, model.safetensors)
tests/fixtures/tiny-bert-outputs.json
                                    a padded batch of 3 sequences (ids, token types, lengths)
                                    and Hugging Face BertModel's last_hidden_state and
                                    pooler_output for it (eager attention, f32, CPU)
tests/fixtures/minilm-embeddings.json
                                    sentences (one longer than max_seq_length) with
                                    sentence-transformers' token ids and embeddings (CPU, f32)
tests/fixtures/tiny-gpt2/           a random GPT2LMHeadModel with GPT-2's real vocabulary
                                    (50257) but n_embd 16, 2 layers, 2 heads, n_positions 128
                                    (config.json, model.safetensors; no tokenizer files: the
                                    runtime falls back to GPT-2's BPE embedded in tiktoken-rs)
tests/fixtures/tiny-gpt2-outputs.json
                                    prompts, their GPT-2 token ids, logits at every position for
                                    a fixed sample of vocabulary columns, and greedy
                                    continuations (generate(do_sample=False)) with the top-2
                                    logit margin of every step
tests/fixtures/attention-backward.json
                                    small attention calls (GQA, D != Dv, causal top-left and
                                    bottom-right with Lq != Lk, key padding, a sliding window)
                                    with PyTorch autograd's dQ, dK, dV of sum(O * dO) in f64
                                    (`--only attention-backward`; needs torch alone)
tests/fixtures/bahdanau-tiny.json   a tiny Bahdanau model in PyTorch (nn.GRU bidirectional over
                                    packed sequences, additive attention, nn.GRUCell decoder):
                                    its f32 weights, a padded batch, the label-smoothed loss and
                                    autograd's gradient of every parameter in f64
                                    (`--only bahdanau`; needs torch alone)
tests/fixtures/bahdanau-lstm-tiny.json
                                    the same model with nn.LSTM (bidirectional, packed) and
                                    nn.LSTMCell, the decoder's memory starting at zero
                                    (`--only bahdanau-lstm`; needs torch alone)
tests/fixtures/lstm-tiny.json       one nn.LSTM layer over a packed batch: outputs and autograd
                                    gradients (`--only lstm`; needs torch alone)

Size of the GPT-2 fixture (< 2 MB committed): the token embedding alone is 50257 × n_embd, so
n_embd is 16 and the (tied) embedding is stored in f16 (1.6 MB); the reference model computes
with those same f16-rounded values in f32, so nothing is lost for the comparison. Full logits
would be 50257 values per position, so the JSON keeps, per position, every 131st column (384
columns) plus Hugging Face's top-8 columns; the greedy continuations test the argmax over the
whole vocabulary at every step.

tests/fixtures/training-ops.json
                                    PyTorch (f64, CPU) on small inputs: F.gelu (erf, tanh) of
                                    x + b with autograd's dx and dbias, F.cross_entropy with
                                    ignore_index and label smoothing (loss, dlogits), the
                                    embedding gradient, clip_grad_norm_, and three
                                    torch.optim.AdamW steps (decay and no-decay groups)
tests/fixtures/tiny-bert-cls/      the tiny BERT as a BertForSequenceClassification with 3 labels
                                    (`bert.`-prefixed keys + classifier.weight/bias; the head
                                    redrawn with the same spread as the encoder)
tests/fixtures/tiny-bert-cls-train.json
                                    the tiny BERT batch with labels: logits and cross-entropy
                                    loss (dropout off), a label-smoothed/ignore_index loss and its
                                    dlogits, and two torch.optim.AdamW steps (clip_grad_norm_ 1.0,
                                    no decay on biases/LayerNorm) with the loss and gradient norm
                                    before each step
tests/fixtures/tiny-bert-cls-grads.safetensors
                                    autograd's gradient of every parameter (`grad.<name>`) at the
                                    fixture weights, and every parameter after the two AdamW
                                    steps (`adamw2.<name>`), f32
tests/fixtures/tiny-bert-pretrain-step.json, tiny-bert-pretrain-step.safetensors
                                    one MLM+NSP step of the tiny BertForPreTraining on the
                                    pair batch of tiny-bert-pretraining-outputs.json (eval
                                    mode): both losses, autograd's gradient of every parameter
                                    (`grad.<name>`; the word embeddings' includes the tied
                                    decoder's) and every parameter after one AdamW step
                                    (`adamw1.<name>`), f32 (`--only bert-pretrain-step`)
tests/fixtures/tiny-bart-denoise-step.json, tiny-bart-denoise-step.safetensors
                                    one denoising step of the tied tiny BART: two texts noised by
                                    our text infilling (spans from `cuattn noise --json`, so
                                    target/release/cuattn must be built), labels = the
                                    originals, decoder fed shift_tokens_right(labels): loss,
                                    autograd's gradient of every parameter
                                    (`tiny-bart.grad.<name>`) and every parameter after
                                    one AdamW step (`tiny-bart.adamw1.<name>`)
                                    (`--only bart-denoise-step`)
tests/fixtures/tiny-bart-untied-denoise-step.json, tiny-bart-untied-denoise-step.safetensors
                                    the same step of the untied tiny BART on the same batch:
                                    loss, gradients (`grad.<name>`; model.shared gets none),
                                    parameters after one and two AdamW steps (`adamw1.<name>`,
                                    `adamw2.<name>`), and with dropout on (our Philox masks
                                    substituted for torch's dropout) the loss and gradients
                                    (`dropout.grad.<name>`) (`--only bart-denoise-step-untied`)
tests/fixtures/tiny-bart-saved-hf.json, tiny-bart-saved-hf.safetensors
                                    transformers reading tests/fixtures/tiny-bart-saved and
                                    tiny-bart-untied-saved (written by our save_pretrained:
                                    `cargo test --release --test train_bart_save -- --ignored`
                                    first): its loading report and warnings, the names its own
                                    re-save writes, and the logits of the denoising batch
                                    (`--only bart-saved`, not part of the default run)

tests/fixtures/tiny-gpt-neo/        a random 4-layer GPTNeoForCausalLM (global/local alternating, window 4,
                                    hidden 16) with a 320-token byte-level BPE (tokenizer.json)
tests/fixtures/tiny-gpt-neo-outputs.json
                                    prompts longer than the window: ids, logits (every 7th column
                                    plus the top 8) and 16 greedy tokens, of the model and of the
                                    same weights with every layer global (`--only gpt-neo`)

tests/fixtures/tiny-gpt1/           a random 2-layer OpenAIGPTLMHeadModel with a ~300-token BPE in
                                    OpenAIGPTTokenizer's pipeline (tokenizer.json, and the same BPE
                                    as vocab.json + merges.txt)
tests/fixtures/tiny-gpt1-outputs.json
                                    texts, their GPT-1 token ids, logits (every 4th column plus the
                                    top 8) at every position, 12 greedy tokens
                                    (`--only gpt1`)

tests/fixtures/adamw-no-grad.json  three torch.optim.AdamW steps (f32, single-tensor) over three
                                    parameters, some with `grad = None` in a step (skipped, with
                                    per-parameter step counts): start values, gradients (null
                                    for None), parameters and torch's step counts after each
                                    step (`--only adamw-no-grad`)

Run with `--only gpt2` to rewrite the GPT-2 fixtures alone (the tokenizer files come from the
tiktoken-rs crate's assets in the cargo registry, found with `--gpt2-bpe-dir` or by search).

The tiny model's weights are redrawn with larger spread than BERT's 0.02 initialisation so
every layer changes the hidden states measurably (a near-identity model would hide bugs).
"""
import argparse
import json
import os

import torch
import transformers
import sentence_transformers
from sentence_transformers import SentenceTransformer
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def tiny_bert():
    torch.manual_seed(1234)
    config = BertConfig(
        vocab_size=101,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_act="gelu",
        max_position_embeddings=24,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        attn_implementation="eager",
    )
    model = BertModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias") or "LayerNorm.bias" in name:
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.3)
    out_dir = os.path.join(FIXTURES, "tiny-bert")
    model.save_pretrained(out_dir, safe_serialization=True)

    lens = [7, 12, 3]
    length = max(lens)
    gen = torch.Generator().manual_seed(99)
    ids = torch.randint(1, config.vocab_size, (len(lens), length), generator=gen)
    types = torch.randint(0, 2, (len(lens), length), generator=gen)
    mask = torch.zeros(len(lens), length, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, :n] = 1
        ids[b, n:] = 0
        types[b, n:] = 0
    with torch.no_grad():
        out = model(input_ids=ids, token_type_ids=types, attention_mask=mask)
    record = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "lens": lens,
        "len": length,
        "ids": ids.flatten().tolist(),
        "type_ids": types.flatten().tolist(),
        "hidden": out.last_hidden_state.flatten().tolist(),
        "pooled": out.pooler_output.flatten().tolist(),
    }
    with open(os.path.join(FIXTURES, "tiny-bert-outputs.json"), "w") as f:
        json.dump(record, f)


SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Hi",
    "",
    "Attention is all you need: the Transformer replaces recurrence with self-attention, "
    "and every position attends to every other one in a single step.",
    # Longer than max_seq_length (256 tokens): sentence-transformers truncates it.
    " ".join(["the quick brown fox jumps over the lazy dog"] * 40),
]


def tiny_bert_batch():
    with open(os.path.join(FIXTURES, "tiny-bert-outputs.json")) as f:
        rec = json.load(f)
    n, length = len(rec["lens"]), rec["len"]
    ids = torch.tensor(rec["ids"]).reshape(n, length)
    types = torch.tensor(rec["type_ids"]).reshape(n, length)
    mask = torch.zeros(n, length, dtype=torch.long)
    for b, l in enumerate(rec["lens"]):
        mask[b, :l] = 1
    return rec, ids, types, mask


def tiny_bert_cls():
    """Gradients and two AdamW steps of a BertForSequenceClassification on the tiny BERT."""
    from safetensors.torch import save_file
    from transformers import BertForSequenceClassification

    torch.manual_seed(4321)
    labels_names = ["neg", "neu", "pos"]
    model = BertForSequenceClassification.from_pretrained(
        os.path.join(FIXTURES, "tiny-bert"),
        num_labels=3,
        id2label=dict(enumerate(labels_names)),
        label2id={n: i for i, n in enumerate(labels_names)},
        attn_implementation="eager",
    )
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.3)
        model.classifier.bias.normal_(0.0, 0.2)
    model.architectures = ["BertForSequenceClassification"]
    out_dir = os.path.join(FIXTURES, "tiny-bert-cls")
    model.save_pretrained(out_dir, safe_serialization=True)
    # Dropout off (model.eval()), gradients still flow.
    model.eval()
    rec, ids, types, mask = tiny_bert_batch()
    labels = torch.tensor([2, 0, 1])

    def loss_and_grads():
        model.zero_grad()
        out = model(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels)
        out.loss.backward()
        return out

    out = loss_and_grads()
    tensors = {f"grad.{n}": p.grad.detach().clone() for n, p in model.named_parameters()}
    record = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "labels": labels.tolist(),
        "logits": out.logits.detach().flatten().tolist(),
        "loss": out.loss.item(),
    }
    # The loss op alone: label smoothing and an ignored row.
    z = out.logits.detach().clone().requires_grad_(True)
    smooth_labels = torch.tensor([2, -100, 1])
    smooth = torch.nn.functional.cross_entropy(z, smooth_labels, ignore_index=-100, label_smoothing=0.1)
    smooth.backward()
    record["smoothing"] = {
        "labels": smooth_labels.tolist(),
        "label_smoothing": 0.1,
        "loss": smooth.item(),
        "dlogits": z.grad.flatten().tolist(),
    }
    # Two AdamW steps from the saved weights, HF Trainer's grouping (no decay on biases and
    # LayerNorm weights), clipping at global norm 1.0 before each step.
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    hp = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "max_grad_norm": 1.0}
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"], foreach=False,
    )
    losses, norms = [], []
    for _ in range(2):
        out = loss_and_grads()
        losses.append(out.loss.item())
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), hp["max_grad_norm"]).item())
        opt.step()
    record["adamw"] = dict(hp, losses=losses, grad_norms=norms)
    for n, p in model.named_parameters():
        tensors[f"adamw2.{n}"] = p.detach().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(FIXTURES, "tiny-bert-cls-grads.safetensors"))
    with open(os.path.join(FIXTURES, "tiny-bert-cls-train.json"), "w") as f:
        json.dump(record, f)


def minilm(folder):
    model = SentenceTransformer(folder, device="cpu")
    emb = model.encode(SENTENCES, batch_size=4, convert_to_numpy=True)
    features = model.tokenize(SENTENCES)
    ids = []
    for row, m in zip(features["input_ids"].tolist(), features["attention_mask"].tolist()):
        ids.append(row[: sum(m)])
    record = {
        "generator": f"scripts/make_fixtures.py, sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}",
        "max_seq_length": model.max_seq_length,
        "sentences": SENTENCES,
        "token_ids": ids,
        "embeddings": emb.tolist(),
    }
    with open(os.path.join(FIXTURES, "minilm-embeddings.json"), "w") as f:
        json.dump(record, f)


GPT2_PROMPTS = [
    "Hello, my dog is cute",
    "The quick brown fox jumps over the lazy dog.",
    "In 1905, Albert Einstein published",
    " naïve café — 🤖 ünïcödé!",
]


def find_gpt2_bpe_dir(given):
    if given:
        return given
    import glob
    hits = sorted(glob.glob(os.path.expanduser(
        "~/.cargo/registry/src/*/tiktoken-rs-*/assets/encoder.json")))
    if not hits:
        raise SystemExit("no tiktoken-rs assets in ~/.cargo/registry: run `cargo fetch` first "
                         "or pass --gpt2-bpe-dir")
    return os.path.dirname(hits[-1])


def tiny_gpt2(bpe_dir):
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # GPT-2's byte-level BPE from its original files (transformers 5's GPT2TokenizerFast
    # no longer loads them from file arguments; the tokenizers library does).
    tok = Tokenizer(models.BPE.from_file(os.path.join(bpe_dir, "encoder.json"),
                                         os.path.join(bpe_dir, "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    torch.manual_seed(4321)
    config = GPT2Config(
        vocab_size=50257,
        n_positions=128,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_inner=None,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
        bos_token_id=50256,
        eos_token_id=50256,
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        # Larger spread than GPT-2's 0.02 initialisation: every layer matters and the logits
        # have real margins (a near-uniform distribution would make greedy decoding a coin toss).
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.3)
        # The stored embedding is f16: compute the reference with the same rounded values.
        wte = model.transformer.wte.weight
        wte.copy_(wte.half().float())
    out_dir = os.path.join(FIXTURES, "tiny-gpt2")
    model.save_pretrained(out_dir, safe_serialization=True)
    path = os.path.join(out_dir, "model.safetensors")
    tensors = load_file(path)
    for k in list(tensors):
        if k.endswith("wte.weight"):
            tensors[k] = tensors[k].half()
        tensors[k] = tensors[k].contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(out_dir, extra)):
            os.remove(os.path.join(out_dir, extra))

    cols = list(range(0, config.vocab_size, 131))
    cases = []
    for prompt in GPT2_PROMPTS:
        ids = tok.encode(prompt).ids
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=x).logits[0]
            gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=20, pad_token_id=50256,
                                 output_scores=True, return_dict_in_generate=True)
        positions = []
        for t in range(len(ids)):
            row = logits[t]
            top = torch.topk(row, 8).indices.tolist()
            c = sorted(set(cols) | set(top))
            positions.append({"columns": c, "values": [round(float(row[j]), 7) for j in c]})
        margins = []
        for s in gen.scores:
            top2 = torch.topk(s[0].float(), 2).values
            margins.append(round(float(top2[0] - top2[1]), 6))
        cases.append({
            "prompt": prompt,
            "ids": ids,
            "logits": positions,
            "greedy": gen.sequences[0, len(ids):].tolist(),
            "greedy_text": tok.decode(gen.sequences[0, len(ids):].tolist()),
            "greedy_margins": margins,
        })
    record = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "max_new_tokens": 20,
        "cases": cases,
    }
    with open(os.path.join(FIXTURES, "tiny-gpt2-outputs.json"), "w") as f:
        json.dump(record, f)


TINY_WORDS = (
    "the a film movie food meal service staff hotel room trip show book app was is were "
    "very so not really and but too it this that i we loved hated liked great good lovely "
    "kind clean fast fresh fun bad awful rude dirty slow cold boring terrible broken late "
    "again never always ."
).split()

TINY_TRAIN = [
    ("the film was great", "positive"),
    ("the food was cold and bad", "negative"),
    ("we loved the hotel room", "positive"),
    ("the staff were rude", "negative"),
    ("a very fun show", "positive"),
    ("the service was slow and the room was dirty", "negative"),
    ("i liked this book", "positive"),
    ("the app is broken again", "negative"),
    ("so kind and fast", "positive"),
    ("boring movie", "negative"),
    ("the meal was fresh and really good", "positive"),
    ("we hated it", "negative"),
    ("lovely clean room", "positive"),
    ("the trip was awful", "negative"),
]

TINY_PROBES = [
    "the film was great",
    "the staff were rude and slow",
    "not good",
    "i loved the meal but the room was cold",
]

# The `cuattn finetune` options of the fixture run (tests/cli_finetune.rs passes the same).
TINY_RUN = {
    "batch_size": 3,
    "grad_accum": 2,
    "max_steps": 4,
    "lr": 5e-3,
    "weight_decay": 0.01,
    "warmup_steps": 1,
    "max_grad_norm": 0.5,
    "max_len": 16,
}


def finetune_tiny():
    """A tiny classifier, its tokenizer and data, and PyTorch's run of the options above."""
    from safetensors.torch import save_file
    from transformers import BertForSequenceClassification, BertTokenizerFast

    base = os.path.join(FIXTURES, "finetune-tiny")
    model_dir = os.path.join(base, "model")
    os.makedirs(model_dir, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + TINY_WORDS
    vocab_file = os.path.join(model_dir, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=vocab_file, do_lower_case=True, model_max_length=32)
    tok.save_pretrained(model_dir)

    torch.manual_seed(2024)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_act="gelu",
        max_position_embeddings=32,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
        attn_implementation="eager",
    )
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.uniform_(0.7, 1.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(model_dir, safe_serialization=True)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(model_dir, extra)):
            os.remove(os.path.join(model_dir, extra))
    with open(os.path.join(base, "train.tsv"), "w") as f:
        f.write("text\tlabel\n")
        for t, l in TINY_TRAIN:
            f.write(f"{t}\t{l}\n")

    run = TINY_RUN
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        low = n.lower()
        (no_decay if ("bias" in low or "layernorm" in low) else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": run["weight_decay"]},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=run["lr"], betas=(0.9, 0.999), eps=1e-8)
    sched = transformers.get_linear_schedule_with_warmup(opt, run["warmup_steps"], run["max_steps"])
    label2id = config.label2id
    micro = [TINY_TRAIN[i:i + run["batch_size"]]
             for i in range(0, len(TINY_TRAIN), run["batch_size"])]
    groups = [micro[i:i + run["grad_accum"]] for i in range(0, len(micro), run["grad_accum"])]
    model.train()
    steps = []
    step = 0
    while step < run["max_steps"]:
        for group in groups:
            if step >= run["max_steps"]:
                break
            lr = sched.get_last_lr()[0]
            loss_sum = 0.0
            for mb in group:
                enc = tok([t for t, _ in mb], padding="longest", truncation=True,
                          max_length=run["max_len"], return_tensors="pt")
                y = torch.tensor([label2id[l] for _, l in mb])
                out = model(**enc)
                loss = torch.nn.functional.cross_entropy(out.logits, y)
                (loss / len(group)).backward()
                loss_sum += float(loss.detach()) / len(group)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), run["max_grad_norm"])
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            steps.append({"step": step, "loss": loss_sum, "lr": lr, "grad_norm": float(norm)})
    model.eval()
    with torch.no_grad():
        enc = tok(TINY_PROBES, padding="longest", return_tensors="pt")
        logits = model(**enc).logits
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    save_file(tensors, os.path.join(base, "expected.safetensors"), metadata={"format": "pt"})
    record = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "run": run,
        "steps": steps,
        "probes": TINY_PROBES,
        "probe_logits": logits.tolist(),
    }
    with open(os.path.join(base, "expected.json"), "w") as f:
        json.dump(record, f, indent=1)
def training_ops():
    """Small f64 cases of the training ops; inputs are f32-representable, so the Rust f64
    references read exactly the same values."""
    torch.manual_seed(99)
    f = torch.nn.functional

    def rand(*shape, spread=1.0):
        return ((torch.rand(*shape, dtype=torch.float32) * 2 - 1) * spread).double()

    def flat(t):
        return t.detach().reshape(-1).tolist()

    out = {}
    gelu = []
    for kind, approx in (("erf", "none"), ("tanh", "tanh")):
        x, b, dy = rand(4, 6, spread=3.0), rand(6), rand(4, 6)
        x.requires_grad_(True)
        b.requires_grad_(True)
        y = f.gelu(x + b, approximate=approx)
        y.backward(dy)
        gelu.append({"kind": kind, "rows": 4, "cols": 6, "x": flat(x), "bias": flat(b),
                     "dy": flat(dy), "y": flat(y), "dx": flat(x.grad), "dbias": flat(b.grad)})
    out["bias_gelu"] = gelu
    xent = []
    for eps in (0.0, 0.1):
        logits = rand(5, 7, spread=4.0).requires_grad_(True)
        labels = torch.tensor([3, -100, 0, 6, 2])
        loss = f.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=eps)
        loss.backward()
        xent.append({"smoothing": eps, "ignore_index": -100, "classes": 7,
                     "logits": flat(logits), "labels": labels.tolist(), "loss": loss.item(),
                     "dlogits": flat(logits.grad)})
    out["cross_entropy"] = xent
    ids = torch.tensor([4, 1, 4, 0, 4, 2, 1, 4, 0])
    w = rand(5, 3).requires_grad_(True)
    dy = rand(9, 3)
    f.embedding(ids, w).backward(dy)
    out["embedding"] = {"vocab": 5, "width": 3, "ids": ids.tolist(), "dy": flat(dy),
                        "dtable": flat(w.grad)}
    grads = [rand(7), rand(3, 2)]
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p_, g in zip(params, grads):
        p_.grad = g.clone()
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm=0.5)
    out["clip"] = {"max_norm": 0.5, "grads": [flat(g) for g in grads], "norm": norm.item(),
                   "clipped": [flat(p_.grad) for p_ in params]}
    decayed, plain = rand(6).requires_grad_(True), rand(4).requires_grad_(True)
    start = [flat(decayed), flat(plain)]
    opt = torch.optim.AdamW([{"params": [decayed], "weight_decay": 0.1},
                             {"params": [plain], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    steps = []
    for _ in range(3):
        g = [rand(6, spread=2.0), rand(4, spread=2.0)]
        decayed.grad, plain.grad = g[0].clone(), g[1].clone()
        opt.step()
        steps.append({"grads": [flat(t) for t in g], "params": [flat(decayed), flat(plain)]})
    out["adamw"] = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
                    "weight_decay": 0.1, "start": start, "steps": steps}
    out["torch_version"] = torch.__version__
    with open(os.path.join(FIXTURES, "training-ops.json"), "w") as fh:
        json.dump(out, fh)
def adamw_no_grad():
    """torch.optim.AdamW (single-tensor, f32) over three parameters for three steps, where a
    parameter whose gradient is None in a step is skipped (no decay, no moment update, its own
    step count): c has none in step 1, b none in step 2. Two groups: a and c decayed, b not."""
    torch.manual_seed(2024)

    def rand(*shape, spread=1.0):
        return (torch.rand(*shape, dtype=torch.float32) * 2 - 1) * spread

    def flat(t):
        return t.detach().reshape(-1).tolist()

    a, b, c = rand(6).requires_grad_(True), rand(4).requires_grad_(True), rand(3, 2).requires_grad_(True)
    params = [a, b, c]
    start = [flat(p_) for p_ in params]
    lr, wd = 1e-2, 0.1
    opt = torch.optim.AdamW([{"params": [a, c], "weight_decay": wd},
                             {"params": [b], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    missing = [[2], [1], []]  # indices into params without a gradient, per step
    steps = []
    for none in missing:
        grads = []
        for i, p_ in enumerate(params):
            if i in none:
                p_.grad = None
                grads.append(None)
            else:
                g = rand(*p_.shape, spread=2.0)
                p_.grad = g.clone()
                grads.append(flat(g))
        opt.step()
        steps.append({"grads": grads, "params": [flat(p_) for p_ in params],
                      "torch_steps": [int(opt.state[p_]["step"]) if p_ in opt.state else 0
                                      for p_ in params]})
    out = {"lr": lr, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": wd,
           "decay": [True, False, True], "shapes": [list(p_.shape) for p_ in params],
           "start": start, "steps": steps, "torch_version": torch.__version__}
    with open(os.path.join(FIXTURES, "adamw-no-grad.json"), "w") as fh:
        json.dump(out, fh)


def attention_backward():
    """dQ, dK, dV by autograd for a few option combinations. Masks are built as boolean
    matrices (key j visible to query i), independently of the crate's band code; inputs are
    f32 values carried in f64, and no case has a fully masked row (softmax would give NaN)."""
    gen = torch.Generator().manual_seed(4321)
    cases = []
    specs = [
        # name, B, Hq, Hkv, Lq, Lk, D, Dv, causal, key_lens, window (left, right, align)
        ("gqa_unequal_dims", 2, 4, 2, 5, 7, 6, 4, None, None, None),
        ("causal_top_left", 1, 2, 1, 6, 4, 5, 5, "top_left", None, None),
        ("causal_bottom_right", 1, 2, 2, 4, 7, 4, 3, "bottom_right", None, None),
        ("key_padding_mqa", 2, 3, 1, 5, 6, 4, 4, None, [6, 2], None),
        ("window_causal", 1, 2, 1, 7, 7, 4, 4, "top_left", None, (2, 0, "top_left")),
    ]
    for name, b, hq, hkv, lq, lk, d, dv, causal, key_lens, window in specs:
        q = torch.randn(b, hq, lq, d, generator=gen).float().double().requires_grad_()
        k = torch.randn(b, hkv, lk, d, generator=gen).float().double().requires_grad_()
        v = torch.randn(b, hkv, lk, dv, generator=gen).float().double().requires_grad_()
        do = torch.randn(b, hq, lq, dv, generator=gen).float().double()
        scale = 1.0 / d ** 0.5
        keep = torch.ones(b, 1, lq, lk, dtype=torch.bool)
        for bb in range(b):
            kl = key_lens[bb] if key_lens else lk
            for i in range(lq):
                for j in range(lk):
                    ok = j < kl
                    off = lambda align: 0 if align == "top_left" else kl - lq
                    if causal:
                        ok = ok and j <= i + off(causal)
                    if window:
                        left, right, align = window
                        ok = ok and i + off(align) - left <= j <= i + off(align) + right
                    keep[bb, 0, i, j] = ok
        assert keep.any(dim=-1).all(), name
        group = hq // hkv
        kr = k.repeat_interleave(group, dim=1)
        vr = v.repeat_interleave(group, dim=1)
        o = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=keep, scale=scale)
        (o * do).sum().backward()
        cases.append({
            "name": name,
            "shape": [b, hq, hkv, lq, lk, d, dv],
            "causal": causal,
            "key_lens": key_lens,
            "window": list(window) if window else None,
            "q": q.detach().flatten().tolist(),
            "k": k.detach().flatten().tolist(),
            "v": v.detach().flatten().tolist(),
            "do": do.flatten().tolist(),
            "o": o.detach().flatten().tolist(),
            "dq": q.grad.flatten().tolist(),
            "dk": k.grad.flatten().tolist(),
            "dv": v.grad.flatten().tolist(),
        })
    record = {
        "generator": f"scripts/make_fixtures.py attention_backward, torch {torch.__version__}, f64 autograd through SDPA",
        "cases": cases,
    }
    with open(os.path.join(FIXTURES, "attention-backward.json"), "w") as f:
        json.dump(record, f)


GPT2_BEAM_CASES = [
    # (prompts, generate kwargs)
    (["Hello, my dog is cute"], dict(num_beams=4, max_new_tokens=10)),
    (["The quick brown fox jumps over the lazy dog."],
     dict(num_beams=3, num_return_sequences=2, length_penalty=2.0, early_stopping=True,
          max_new_tokens=8)),
    (["In 1905, Albert Einstein published"],
     dict(num_beams=4, num_return_sequences=4, no_repeat_ngram_size=2, length_penalty=0.5,
          early_stopping="never", max_new_tokens=9)),
    (["Hello, my dog is cute", "In 1905"], dict(num_beams=3, max_new_tokens=7)),
    # Greedy with the logits processors.
    (["Hello, my dog is cute"], dict(num_beams=1, no_repeat_ngram_size=2, max_new_tokens=16)),
]


def generation_record(gen, prompt_len, eos, nrs):
    """Generated ids after the prompt, cut after the first end-of-text (HF pads behind it),
    and the sequence scores when there are any."""
    out = []
    for row in gen.sequences[:, prompt_len:].tolist():
        if eos in row:
            row = row[: row.index(eos) + 1]
        out.append(row)
    scores = gen.sequences_scores.tolist() if getattr(gen, "sequences_scores", None) is not None else []
    return out, [round(float(s), 6) for s in scores]


def gpt2_beams(bpe_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.BPE.from_file(os.path.join(bpe_dir, "encoder.json"),
                                         os.path.join(bpe_dir, "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model = GPT2LMHeadModel.from_pretrained(os.path.join(FIXTURES, "tiny-gpt2"),
                                            attn_implementation="eager").eval()
    cases = []
    for prompts, kwargs in GPT2_BEAM_CASES:
        ids = [tok.encode(p).ids for p in prompts]
        width = max(map(len, ids))
        # Left padding, as HF batches decoder-only prompts.
        x = torch.tensor([[50256] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        with torch.no_grad():
            gen = model.generate(x, attention_mask=mask, do_sample=False, pad_token_id=50256,
                                 return_dict_in_generate=True, output_scores=True, **kwargs)
        generated, scores = generation_record(gen, width, 50256, kwargs.get("num_return_sequences", 1))
        cases.append({"prompts": prompts, "ids": ids, "options": kwargs,
                      "generated": generated, "scores": scores})
    record = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "cases": cases,
    }
    with open(os.path.join(FIXTURES, "tiny-gpt2-beams.json"), "w") as f:
        json.dump(record, f)


BART_TEXTS = [
    "The tower is 324 metres tall, about the same height as an 81-storey building.",
    "Hello world!",
    "BART joins a bidirectional encoder with an autoregressive decoder.",
]


BART_CORPUS = BART_TEXTS + [
    "A man is eating food. A man is riding a horse. The girl is carrying a baby.",
    "the quick brown fox jumps over the lazy dog " * 3,
    "Denoising autoencoders reconstruct text from corrupted inputs: masking, deletion, "
    "infilling, permutation and rotation.",
]


BART_VARIANTS = {
    # name: (tie_word_embeddings, scale_embedding, activation, generation kwargs)
    "tiny-bart": (True, False, "gelu",
                  dict(forced_bos_token_id=0, forced_eos_token_id=2, no_repeat_ngram_size=3,
                       num_beams=4, length_penalty=1.0, early_stopping=True, max_length=16)),
    "tiny-bart-untied": (False, True, "relu",
                         dict(forced_eos_token_id=2, num_beams=3, length_penalty=2.0,
                              early_stopping=False, max_length=14)),
}


def bart_tokenizer(out_dir):
    """A byte-level BPE of 420 tokens trained on a few sentences (BART's real one has 50265
    and would make the fixture megabytes), with BART's special tokens and post-processor."""
    from tokenizers import ByteLevelBPETokenizer, processors
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(BART_CORPUS, vocab_size=420, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    return tok


def tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration
    record = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "variants": {},
    }
    for name, (tied, scaled, act, gen_kwargs) in BART_VARIANTS.items():
        torch.manual_seed(2024 + len(name))
        out_dir = os.path.join(FIXTURES, name)
        os.makedirs(out_dir, exist_ok=True)
        tok = bart_tokenizer(out_dir)
        vocab = tok.get_vocab_size()
        config = BartConfig(
            vocab_size=vocab, d_model=16, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=2, encoder_ffn_dim=24,
            decoder_ffn_dim=20, activation_function=act, max_position_embeddings=64,
            scale_embedding=scaled, tie_word_embeddings=tied, dropout=0.0,
            attention_dropout=0.0, activation_dropout=0.0, bos_token_id=0, pad_token_id=1,
            eos_token_id=2, decoder_start_token_id=2, attn_implementation="eager",
        )
        model = BartForConditionalGeneration(config).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "layer_norm" in pname or "layernorm" in pname:
                    (p.uniform_(0.5, 1.5) if pname.endswith("weight") else p.normal_(0.0, 0.2))
                elif pname.endswith("bias"):
                    p.normal_(0.0, 0.2)
                elif scaled and ("shared" in pname or "embed_tokens" in pname):
                    p.normal_(0.0, 0.3 / 4)  # √d_model = 4 brings them back to 0.3
                else:
                    p.normal_(0.0, 0.3)
            bias = torch.randn(1, vocab) * 0.2
            # End-of-text likely enough to end some beams early.
            bias[0, 2] += 2.5 if tied else 1.0
            model.final_logits_bias.copy_(bias)
        model.save_pretrained(out_dir, safe_serialization=True)
        gc = {k: v for k, v in gen_kwargs.items()}
        gc.update(decoder_start_token_id=2, bos_token_id=0, eos_token_id=2, pad_token_id=1)
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump(gc, f, indent=2)
        model = BartForConditionalGeneration.from_pretrained(out_dir, attn_implementation="eager").eval()
        cases = []
        for text in BART_TEXTS:
            ids = tok.encode(text).ids
            x = torch.tensor([ids])
            with torch.no_grad():
                enc = model.get_encoder()(input_ids=x).last_hidden_state[0]
                greedy = model.generate(x, attention_mask=torch.ones_like(x), num_beams=1,
                                        do_sample=False, max_new_tokens=12,
                                        return_dict_in_generate=True)
                beams = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                       num_return_sequences=2, return_dict_in_generate=True,
                                       output_scores=True, **gen_kwargs)
                dec = greedy.sequences
                logits = model(input_ids=x, decoder_input_ids=dec).logits[0]
            g, _ = generation_record(greedy, 1, 2, 1)
            bm, sc = generation_record(beams, 1, 2, 2)
            cases.append({
                "text": text, "ids": ids,
                "encoder_hidden": [round(float(v), 7) for v in enc.flatten()],
                "decoder_ids": dec[0].tolist(),
                "logits": [round(float(v), 7) for v in logits.flatten()],
                "greedy": g[0], "beams": bm, "beam_scores": sc,
            })
        # A padded batch: every input's encoder states and greedy output as if alone.
        batch = [tok.encode(t).ids for t in BART_TEXTS]
        width = max(map(len, batch))
        x = torch.tensor([i + [1] * (width - len(i)) for i in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in batch])
        with torch.no_grad():
            gen = model.generate(x, attention_mask=mask, do_sample=False, num_beams=1,
                                 max_new_tokens=12, return_dict_in_generate=True)
            bgen = model.generate(x, attention_mask=mask, do_sample=False,
                                  return_dict_in_generate=True, output_scores=True, **gen_kwargs)
        bg, _ = generation_record(gen, 1, 2, 1)
        bb, bsc = generation_record(bgen, 1, 2, 1)
        record["variants"][name] = {
            "config": {"tie_word_embeddings": tied, "scale_embedding": scaled, "activation": act},
            "generation": gen_kwargs,
            "cases": cases,
            "batch": {"greedy": bg, "beams": bb, "beam_scores": bsc},
        }
    with open(os.path.join(FIXTURES, "tiny-bart-outputs.json"), "w") as f:
        json.dump(record, f)


BART_DENOISE_SEEDS = [7, 2]


def our_infill_spans(n_tokens, seed, ratio=0.3, poisson_lambda=3.0):
    """The spans our text infilling (src/data/noise.rs, token-level: every token starts a word)
    picks for a sequence of n_tokens with this seed, from `cuattn noise --json` on n dummy
    words (the spans depend only on the count, the seed and the rates). The binary is
    $CUATTN_BIN or target/release/cuattn."""
    import subprocess
    exe = os.environ.get("CUATTN_BIN", os.path.join(ROOT, "target", "release", "cuattn"))
    words = " ".join(f"w{i}" for i in range(n_tokens))
    out = subprocess.run([exe, "noise", "--transform", "infill", "--seed", str(seed),
                          "--ratio", str(ratio), "--poisson-lambda", str(poisson_lambda),
                          "--json", words], check=True, capture_output=True, text=True).stdout
    return [(s["start"], s["len"]) for s in json.loads(out)["spans"]]


def bart_denoise_step():
    """One denoising training step of the tiny tied BART (dropout 0, eval mode): two texts,
    the tokens between <s> and </s> noised by our text infilling (seeds BART_DENOISE_SEEDS),
    the noised ids right-padded as the encoder's input, the original ids (padded with -100)
    as labels, the decoder fed HF's shift_tokens_right(labels) (decoder_start_token_id
    first). Records the loss, autograd's gradient of every parameter (final_logits_bias is a
    buffer: none) and, for the tied model, every parameter after one torch.optim.AdamW step."""
    from safetensors.torch import save_file
    from transformers import BartForConditionalGeneration
    record = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "noise": {"ratio": 0.3, "poisson_lambda": 3.0, "seeds": BART_DENOISE_SEEDS},
        "variants": {},
    }
    tensors = {}
    texts = [BART_TEXTS[0], BART_TEXTS[2]]
    # The tied model only: in transformers 5 an untied BART keeps three separate tables
    # (each stack's embed_tokens and lm_head; `shared` then gets no gradient), which our
    # trainable BART refuses.
    for name in ["tiny-bart"]:
        out_dir = os.path.join(FIXTURES, name)
        model = BartForConditionalGeneration.from_pretrained(out_dir, attn_implementation="eager").eval()
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
        originals = [tok.encode(t).ids for t in texts]
        noised = []
        for ids, seed in zip(originals, BART_DENOISE_SEEDS):
            inner = ids[1:-1]
            out, at = [], 0
            for start, length in our_infill_spans(len(inner), seed):
                out += inner[at:start] + [4]  # <mask>
                at = start + length
            noised.append([ids[0]] + out + inner[at:] + [ids[-1]])
        pad = model.config.pad_token_id
        w_in, w_out = max(map(len, noised)), max(map(len, originals))
        x = torch.tensor([n + [pad] * (w_in - len(n)) for n in noised])
        mask = torch.tensor([[1] * len(n) + [0] * (w_in - len(n)) for n in noised])
        labels = torch.tensor([o + [-100] * (w_out - len(o)) for o in originals])
        out = model(input_ids=x, attention_mask=mask, labels=labels)
        out.loss.backward()
        named = list(model.named_parameters())
        assert "final_logits_bias" not in [n for n, _ in named]
        for n, p in named:
            if p.grad is None:
                raise SystemExit(f"{name}: no gradient for {n}")
            tensors[f"{name}.grad.{n}"] = p.grad.detach().clone()
        record["variants"][name] = {
            "input_ids": x.tolist(), "lens": [len(n) for n in noised], "labels": labels.tolist(),
            "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=labels).tolist(),
            "loss": out.loss.item(),
            "parameters": [n for n, _ in named],
            "logits_row0": [round(float(v), 7) for v in out.logits[0, 0]],
        }
        if name == "tiny-bart":
            hp = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
            no_decay = lambda n: n.endswith("bias") or "layer_norm" in n or "layernorm" in n
            opt = torch.optim.AdamW(
                [{"params": [p for n, p in named if not no_decay(n)], "weight_decay": hp["weight_decay"]},
                 {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}],
                lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"], foreach=False)
            opt.step()
            for n, p in named:
                tensors[f"{name}.adamw1.{n}"] = p.detach().clone()
            record["variants"][name]["adamw"] = hp
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(FIXTURES, "tiny-bart-denoise-step.safetensors"))
    with open(os.path.join(FIXTURES, "tiny-bart-denoise-step.json"), "w") as f:
        json.dump(record, f)


def bart_saved():
    """Hugging Face reading the folders our BART `save_pretrained` wrote
    (tests/fixtures/tiny-bart-saved, tiny-bart-untied-saved: the ignored test
    `write_the_saved_fixtures` of tests/train_bart_save.rs writes them). For each: the loading
    report of `from_pretrained(output_loading_info=True)` (missing, unexpected and mismatched
    keys, error messages), every warning transformers logged or raised while loading, the tensor
    names of transformers' own `save_pretrained` of the loaded model, and the eval-mode logits
    of the denoising fixture's batch (`<name>.logits`, [batch·len_out·vocab] flattened)."""
    import logging
    import tempfile
    import warnings
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import BartForConditionalGeneration
    step = json.load(open(os.path.join(FIXTURES, "tiny-bart-denoise-step.json")))["variants"]["tiny-bart"]
    x = torch.tensor(step["input_ids"])
    lens = step["lens"]
    mask = torch.tensor([[1] * n + [0] * (x.shape[1] - n) for n in lens])
    labels = torch.tensor(step["labels"])
    record = {"generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}"}
    tensors = {}

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, r):
            self.messages.append(r.getMessage())

    for name in ["tiny-bart-saved", "tiny-bart-untied-saved"]:
        folder = os.path.join(FIXTURES, name)
        handler = Collect()
        logger = logging.getLogger("transformers")
        logger.addHandler(handler)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = BartForConditionalGeneration.from_pretrained(
                folder, attn_implementation="eager", output_loading_info=True)
        logger.removeHandler(handler)
        model.eval()
        with torch.no_grad():
            out = model(input_ids=x, attention_mask=mask, labels=labels)
        tensors[f"{name}.logits"] = out.logits.reshape(-1).contiguous()
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
                resaved = sorted(f.keys())
        record[name] = {
            "missing_keys": sorted(info["missing_keys"]),
            "unexpected_keys": sorted(info["unexpected_keys"]),
            "mismatched_keys": sorted(str(k) for k in info["mismatched_keys"]),
            "error_msgs": list(info["error_msgs"]),
            "warnings": handler.messages + [str(w.message) for w in caught],
            "resaved_keys": resaved,
            "loss": out.loss.item(),
        }
    save_file(tensors, os.path.join(FIXTURES, "tiny-bart-saved-hf.safetensors"))
    with open(os.path.join(FIXTURES, "tiny-bart-saved-hf.json"), "w") as f:
        json.dump(record, f, indent=1)


# Dyadic probabilities: the same numbers in f32 (our config) and f64 (PyTorch's), so the
# keep threshold round(p·2^32) and the scale 1/(1−p) agree on both sides.
BART_UNTIED_DROPOUT = {"dropout": 0.25, "attention_dropout": 0.125, "activation_dropout": 0.375,
                       "seed": 11, "step": 3}


def philox_words(seed, offset, n):
    """Words 0..n of the Philox4x32-10 stream (seed, offset) of src/rng.rs (counter = (block
    lo, block hi, offset lo, offset hi), key = (seed lo, seed hi), element i = word i % 4 of
    block i / 4), vectorized with numpy; checked on Random123's first known answer."""
    import numpy as np
    m32 = np.uint64(0xFFFFFFFF)
    blocks = np.arange((n + 3) // 4, dtype=np.uint64)
    c = [blocks & m32, blocks >> np.uint64(32),
         np.full_like(blocks, offset & 0xFFFFFFFF), np.full_like(blocks, offset >> 32)]
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    for r in range(10):
        if r > 0:
            k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0), p1 & m32,
             (p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1), p0 & m32]
    return np.stack(c, axis=1).reshape(-1)[:n]


def our_dropout_in_torch(seed, step, sites_per_step):
    """A stand-in for torch.nn.functional.dropout that applies our masks: its k-th call of a
    forward is our site k (offset step·sites_per_step + k), keeping element i (row-major) when
    its Philox word ≥ round(p·2^32) and scaling kept ones by f32(1/(1−p)). Returns the function
    and the list of (shape, p) it was called with."""
    import numpy as np
    calls = []

    def dropout(x, p=0.5, training=True, inplace=False):
        if not training:
            return x
        k = len(calls)
        calls.append((tuple(x.shape), p))
        if p == 0:
            return x
        p32 = float(np.float32(p))
        words = philox_words(seed, step * sites_per_step + k, x.numel())
        keep = torch.from_numpy((words >= round(p32 * 2 ** 32)).reshape(x.shape))
        return x * keep.to(x.dtype) * float(np.float32(1.0 / (1.0 - p32)))
    return dropout, calls


def bart_denoise_step_untied():
    """The denoising step of the tiny untied BART (tests/fixtures/tiny-bart-untied) on the
    tied fixture's batch (tiny-bart-denoise-step.json; the two models share the tokenizer):
    in transformers 5 it has four token tables, model.shared (read by nothing: no gradient)
    and each stack's embed_tokens and lm_head. Records, dropout 0: the loss, autograd's
    gradient of every parameter that has one (`grad.<name>`), every parameter after one and
    after two torch.optim.AdamW steps (`adamw1.<name>`, `adamw2.<name>`; model.shared, without
    a gradient, is skipped by AdamW) and the loss before the second step. Then, in train mode
    with BART_UNTIED_DROPOUT's probabilities and torch's dropout replaced by our Philox masks
    (our_dropout_in_torch; its call order is our site order, checked by count and shape):
    the loss and every gradient (`dropout.grad.<name>`)."""
    from safetensors.torch import save_file
    from transformers import BartForConditionalGeneration
    name = "tiny-bart-untied"
    out_dir = os.path.join(FIXTURES, name)
    with open(os.path.join(FIXTURES, "tiny-bart-denoise-step.json")) as f:
        tied = json.load(f)["variants"]["tiny-bart"]
    x = torch.tensor(tied["input_ids"])
    lens = tied["lens"]
    mask = torch.tensor([[1] * n + [0] * (x.shape[1] - n) for n in lens])
    labels = torch.tensor(tied["labels"])
    model = BartForConditionalGeneration.from_pretrained(out_dir, attn_implementation="eager").eval()
    assert not model.config.tie_word_embeddings
    tables = ["model.shared.weight", "model.encoder.embed_tokens.weight",
              "model.decoder.embed_tokens.weight", "lm_head.weight"]
    params = dict(model.named_parameters())
    assert all(n in params for n in tables)
    ptrs = {params[n].data_ptr() for n in tables}
    assert len(ptrs) == 4, "an untied BART's four tables are distinct parameters"
    tensors = {}
    out = model(input_ids=x, attention_mask=mask, labels=labels)
    out.loss.backward()
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == ["model.shared.weight"], no_grad
    for n, p in named:
        tensors[f"grad.{n}"] = p.grad.detach().clone()
    record = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "batch": "tiny-bart-denoise-step.json variants.tiny-bart",
        "loss": out.loss.item(),
        "parameters": [n for n, _ in named],
        "without_gradient": no_grad,
        "logits_row0": [round(float(v), 7) for v in out.logits[0, 0].detach()],
    }
    hp = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
    no_decay = lambda n: n.endswith("bias") or "layer_norm" in n or "layernorm" in n
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in named if not no_decay(n)], "weight_decay": hp["weight_decay"]},
         {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}],
        lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"], foreach=False)
    opt.step()
    for n, p in named:
        tensors[f"adamw1.{n}"] = p.detach().clone()
    opt.zero_grad()
    out2 = model(input_ids=x, attention_mask=mask, labels=labels)
    out2.loss.backward()
    opt.step()
    for n, p in named:
        tensors[f"adamw2.{n}"] = p.detach().clone()
    record["adamw"] = hp
    record["loss_after_step1"] = out2.loss.item()

    dp = BART_UNTIED_DROPOUT
    model = BartForConditionalGeneration.from_pretrained(
        out_dir, attn_implementation="eager", dropout=dp["dropout"],
        attention_dropout=dp["attention_dropout"], activation_dropout=dp["activation_dropout"])
    model.train()
    c = model.config
    sites = 2 + 4 * c.encoder_layers + 6 * c.decoder_layers
    ours, calls = our_dropout_in_torch(dp["seed"], dp["step"], sites)
    saved = torch.nn.functional.dropout
    torch.nn.functional.dropout = ours
    try:
        out = model(input_ids=x, attention_mask=mask, labels=labels)
    finally:
        torch.nn.functional.dropout = saved
    b, lin, lout = x.shape[0], x.shape[1], labels.shape[1]
    d, eh, dh = c.d_model, c.encoder_attention_heads, c.decoder_attention_heads
    want = [((b, lin, d), dp["dropout"])]
    for _ in range(c.encoder_layers):
        want += [((b, eh, lin, lin), dp["attention_dropout"]), ((b, lin, d), dp["dropout"]),
                 ((b, lin, c.encoder_ffn_dim), dp["activation_dropout"]), ((b, lin, d), dp["dropout"])]
    want.append(((b, lout, d), dp["dropout"]))
    for _ in range(c.decoder_layers):
        want += [((b, dh, lout, lout), dp["attention_dropout"]), ((b, lout, d), dp["dropout"]),
                 ((b, dh, lout, lin), dp["attention_dropout"]), ((b, lout, d), dp["dropout"]),
                 ((b, lout, c.decoder_ffn_dim), dp["activation_dropout"]), ((b, lout, d), dp["dropout"])]
    assert calls == want, f"HF's dropout calls are not our sites:\n{calls}\n{want}"
    out.loss.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            tensors[f"dropout.grad.{n}"] = p.grad.detach().clone()
    record["dropout"] = dict(dp, loss=out.loss.item(), sites_per_step=sites)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(FIXTURES, "tiny-bart-untied-denoise-step.safetensors"))
    with open(os.path.join(FIXTURES, "tiny-bart-untied-denoise-step.json"), "w") as f:
        json.dump(record, f)


BERT_PT_CORPUS = [
    "the capital of france is paris .",
    "the capital of italy is rome .",
    "a man is eating food . a man is riding a horse .",
    "the girl is carrying a baby . the dog runs in the park .",
    "paris is a city in france and rome is a city in italy .",
]


FILL_MASK_TEXTS = [
    "The capital of France is [MASK].",
    "a man is [MASK] a horse .",
    "the [MASK] is carrying a [MASK] .",
]


def tiny_bert_pretraining():
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertForPreTraining, BertTokenizerFast, pipeline
    out_dir = os.path.join(FIXTURES, "tiny-bert-pretraining")
    os.makedirs(out_dir, exist_ok=True)
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(BERT_PT_CORPUS, vocab_size=160, min_frequency=1, show_progress=False,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    wp.save(os.path.join(out_dir, "tokenizer.json"))
    tok = BertTokenizerFast(tokenizer_file=os.path.join(out_dir, "tokenizer.json"))
    tok.save_pretrained(out_dir)
    torch.manual_seed(777)
    config = BertConfig(
        vocab_size=wp.get_vocab_size(), hidden_size=24, num_hidden_layers=2,
        num_attention_heads=3, intermediate_size=40, hidden_act="gelu",
        max_position_embeddings=48, type_vocab_size=2, layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
        attn_implementation="eager",
    )
    model = BertForPreTraining(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out_dir, safe_serialization=True)
    model = BertForPreTraining.from_pretrained(out_dir, attn_implementation="eager").eval()

    fill = pipeline("fill-mask", model=out_dir, tokenizer=tok, device="cpu")
    fills = []
    for text in FILL_MASK_TEXTS:
        res = fill(text, top_k=5)
        if isinstance(res[0], dict):
            res = [res]
        fills.append({"text": text, "ids": tok(text)["input_ids"],
                      "results": [[{"score": round(float(r["score"]), 7), "token": r["token"],
                                    "token_str": r["token_str"], "sequence": r["sequence"]}
                                   for r in per_mask] for per_mask in res]})

    # Losses on a padded pair batch with MLM labels and NSP labels.
    pairs = [("the capital of france is paris .", "the dog runs in the park ."),
             ("a man is eating food .", "a man is riding a horse .")]
    enc = tok([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="pt")
    gen = torch.Generator().manual_seed(5)
    labels = torch.full_like(enc["input_ids"], -100)
    special = torch.isin(enc["input_ids"], torch.tensor([0, 2, 3]))
    pick = (torch.rand(enc["input_ids"].shape, generator=gen) < 0.3) & ~special
    labels[pick] = enc["input_ids"][pick]
    inputs = enc["input_ids"].clone()
    inputs[pick] = 4  # [MASK]
    nsp = torch.tensor([1, 0])
    with torch.no_grad():
        out = model(input_ids=inputs, token_type_ids=enc["token_type_ids"],
                    attention_mask=enc["attention_mask"], labels=labels, next_sentence_label=nsp)
        mlm_loss = torch.nn.functional.cross_entropy(
            out.prediction_logits.view(-1, config.vocab_size), labels.view(-1))
        nsp_loss = torch.nn.functional.cross_entropy(out.seq_relationship_logits, nsp)
    record = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "fill_mask": fills,
        "batch": {
            "ids": inputs.tolist(), "type_ids": enc["token_type_ids"].tolist(),
            "lens": enc["attention_mask"].sum(1).tolist(), "mlm_labels": labels.tolist(),
            "nsp_labels": nsp.tolist(),
            "prediction_logits": [round(float(x), 6) for x in out.prediction_logits.flatten()],
            "nsp_logits": [round(float(x), 6) for x in out.seq_relationship_logits.flatten()],
            "mlm_loss": float(mlm_loss), "nsp_loss": float(nsp_loss), "loss": float(out.loss),
        },
    }
    with open(os.path.join(FIXTURES, "tiny-bert-pretraining-outputs.json"), "w") as f:
        json.dump(record, f)



def bert_pretrain_step():
    """One MLM+NSP training step of the tiny BertForPreTraining (dropout off: the config's
    probabilities are 0 and the model is in eval mode) on the padded pair batch of
    tiny-bert-pretraining-outputs.json: both losses, the gradient of every parameter (the word
    embeddings get the input lookup's and the tied decoder's) and every parameter after one
    torch.optim.AdamW step (HF Trainer's grouping: no decay on biases and LayerNorm weights)."""
    from safetensors.torch import save_file
    from transformers import BertForPreTraining
    model = BertForPreTraining.from_pretrained(os.path.join(FIXTURES, "tiny-bert-pretraining"),
                                               attn_implementation="eager").eval()
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    with open(os.path.join(FIXTURES, "tiny-bert-pretraining-outputs.json")) as f:
        b = json.load(f)["batch"]
    ids, types = torch.tensor(b["ids"]), torch.tensor(b["type_ids"])
    mask = torch.zeros_like(ids)
    for i, l in enumerate(b["lens"]):
        mask[i, :l] = 1
    labels, nsp = torch.tensor(b["mlm_labels"]), torch.tensor(b["nsp_labels"])
    out = model(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels,
                next_sentence_label=nsp)
    vocab = model.config.vocab_size
    mlm_loss = torch.nn.functional.cross_entropy(out.prediction_logits.view(-1, vocab), labels.view(-1))
    nsp_loss = torch.nn.functional.cross_entropy(out.seq_relationship_logits, nsp)
    out.loss.backward()
    tensors = {f"grad.{n}": p.grad.detach().clone() for n, p in model.named_parameters()}
    hp = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
    named = list(model.named_parameters())
    no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in named if not no_decay(n)], "weight_decay": hp["weight_decay"]},
         {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}],
        lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"], foreach=False)
    opt.step()
    for n, p in named:
        tensors[f"adamw1.{n}"] = p.detach().clone()
    record = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "mlm_loss": mlm_loss.item(), "nsp_loss": nsp_loss.item(), "loss": out.loss.item(),
        "nsp_logits": out.seq_relationship_logits.detach().flatten().tolist(),
        "parameters": [n for n, _ in named],
        "adamw": hp,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(FIXTURES, "tiny-bert-pretrain-step.safetensors"))
    with open(os.path.join(FIXTURES, "tiny-bert-pretrain-step.json"), "w") as f:
        json.dump(record, f)


GPT_NEO_CORPUS = [
    "GPT-Neo alternates global attention over the whole context with local attention over a "
    "window of recent tokens, as GPT-3 alternated dense and banded sparse layers.",
    "A local layer sees only the last few positions; a global layer sees every earlier one.",
    "the cat sat on the mat and the dog slept by the door while the rain fell on the roof",
    "Seven sailors sailed the seven seas, singing songs of salt and silver stars.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
]

GPT_NEO_PROMPTS = [
    "A local layer sees only the last few positions",
    "the cat sat on the mat and the dog slept by the door",
    "Seven sailors sailed",
    "1 2 3 4 5 6 7 8 9 10 11 12",
]


def tiny_gpt_neo():
    """A random 4-layer GPTNeoForCausalLM (global, local, global, local; window 4) with a
    byte-level BPE of 320 tokens trained on GPT_NEO_CORPUS (GPT-Neo's real vocabulary would
    make the fixture megabytes). Prompts are longer than the window. The same weights are
    also run with every layer global (attention_types [[["global"], 4]]): the Rust tests check
    both, and that they differ."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPTNeoConfig, GPTNeoForCausalLM
    out_dir = os.path.join(FIXTURES, "tiny-gpt-neo")
    os.makedirs(out_dir, exist_ok=True)
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(GPT_NEO_CORPUS, vocab_size=320, min_frequency=1,
                            show_progress=False, special_tokens=["<|endoftext|>"])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    vocab = tok.get_vocab_size()
    torch.manual_seed(1729)
    common = dict(
        vocab_size=vocab, max_position_embeddings=64, hidden_size=16, num_layers=4,
        num_heads=2, intermediate_size=None, window_size=4, activation_function="gelu_new",
        resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0, layer_norm_epsilon=1e-5,
        bos_token_id=eos, eos_token_id=eos, attn_implementation="eager",
    )
    config = GPTNeoConfig(attention_types=[[["global", "local"], 2]], **common)
    model = GPTNeoForCausalLM(config).eval()
    with torch.no_grad():
        # The spread of the GPT-2 fixture (every layer matters, greedy steps have margins).
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out_dir, safe_serialization=True)
    gen_cfg = os.path.join(out_dir, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)
    model = GPTNeoForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
    dense = GPTNeoForCausalLM(GPTNeoConfig(attention_types=[[["global"], 4]], **common)).eval()
    dense.load_state_dict(model.state_dict())
    cols = list(range(0, vocab, 7))

    def logits_record(m, ids):
        with torch.no_grad():
            logits = m(input_ids=torch.tensor([ids])).logits[0]
        rows = []
        for t in range(len(ids)):
            row = logits[t]
            c = sorted(set(cols) | set(torch.topk(row, 8).indices.tolist()))
            rows.append({"columns": c, "values": [round(float(row[j]), 7) for j in c]})
        return rows

    def greedy(m, ids):
        x = torch.tensor([ids])
        with torch.no_grad():
            gen = m.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=16, pad_token_id=eos,
                             output_scores=True, return_dict_in_generate=True)
        margins = [round(float(d), 6) for d in
                   (torch.topk(s[0].float(), 2).values[0] - torch.topk(s[0].float(), 2).values[1]
                    for s in gen.scores)]
        return gen.sequences[0, len(ids):].tolist(), margins

    cases = []
    for prompt in GPT_NEO_PROMPTS:
        ids = tok.encode(prompt).ids
        g, margins = greedy(model, ids)
        dg, _ = greedy(dense, ids)
        cases.append({
            "prompt": prompt, "ids": ids,
            "logits": logits_record(model, ids),
            "greedy": g, "greedy_margins": margins,
            "all_global_logits": logits_record(dense, ids),
            "all_global_greedy": dg,
        })
    record = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "window_size": 4,
        "max_new_tokens": 16,
        "cases": cases,
    }
    with open(os.path.join(FIXTURES, "tiny-gpt-neo-outputs.json"), "w") as f:
        json.dump(record, f)


GPT1_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Generative pre-training of a language model, then discriminative fine-tuning on each task.",
    "It was the best of times, it was the worst of times; it was the age of wisdom.",
    "Numbers like 1905 and 2018 split into digits: 1 9 0 5.",
    "Don't stop: she said \"hello\" (twice) and left!",
]

GPT1_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, WORLD! It's a naïve café résumé.",
    "Generative pre-training, then fine-tuning:   twice\tand\nagain...",
    "unseen symbols: 🤖 ß 中文 #$%",
]


def tiny_gpt1():
    """A random 2-layer OpenAIGPTLMHeadModel with a BPE of about 300 tokens trained on
    GPT1_CORPUS through OpenAIGPTTokenizer's own pipeline (BERT normalizer with lower-casing,
    BERT pre-tokenizer, `</w>` word ends): tokenizer.json, vocab.json and merges.txt."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel, OpenAIGPTTokenizer
    out_dir = os.path.join(FIXTURES, "tiny-gpt1")
    os.makedirs(out_dir, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.BertNormalizer(lowercase=True)
    bpe.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    bpe.train_from_iterator(GPT1_CORPUS, trainers.BpeTrainer(
        vocab_size=300, min_frequency=1, special_tokens=["<unk>"], end_of_word_suffix="</w>",
        show_progress=False))
    bpe.model.save(out_dir)
    with open(os.path.join(out_dir, "vocab.json")) as f:
        vocab = json.load(f)
    with open(os.path.join(out_dir, "merges.txt")) as f:
        merges = [tuple(l.split()) for l in f.read().splitlines() if l and not l.startswith("#version")]
    tok = OpenAIGPTTokenizer(vocab=vocab, merges=merges)
    tok.save_pretrained(out_dir)
    for extra in ("tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(out_dir, extra)):
            os.remove(os.path.join(out_dir, extra))
    torch.manual_seed(1618)
    config = OpenAIGPTConfig(vocab_size=len(vocab), n_positions=48, n_embd=16, n_layer=2, n_head=2,
                             afn="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                             layer_norm_epsilon=1e-5)
    model = OpenAIGPTLMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out_dir, safe_serialization=True)
    gen_cfg = os.path.join(out_dir, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)
    model = OpenAIGPTLMHeadModel.from_pretrained(out_dir).eval()
    cases = []
    for text in GPT1_TEXTS:
        ids = tok(text)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=x).logits[0]
            gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=12, pad_token_id=0, output_scores=True,
                                 return_dict_in_generate=True)
        margins = [round(float(d), 6) for d in
                   (torch.topk(s[0].float(), 2).values[0] - torch.topk(s[0].float(), 2).values[1]
                    for s in gen.scores)]
        cases.append({
            "text": text, "ids": ids,
            "tokens": tok.convert_ids_to_tokens(ids), "decoded": tok.decode(ids),
            "logits": [{"columns": c, "values": [round(float(logits[t, j]), 7) for j in c]}
                       for t, c in ((t, sorted(set(range(0, len(vocab), 4))
                                               | set(torch.topk(logits[t], 8).indices.tolist())))
                                    for t in range(len(ids)))],
            "greedy": gen.sequences[0, len(ids):].tolist(), "greedy_margins": margins,
        })
    record = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "max_new_tokens": 12,
        "cases": cases,
    }
    with open(os.path.join(FIXTURES, "tiny-gpt1-outputs.json"), "w") as f:
        json.dump(record, f)


def bahdanau(cell="gru"):
    """A tiny Bahdanau model in PyTorch (nn.GRU bidirectional over packed sequences, additive
    attention, nn.GRUCell decoder, tanh deep output; with cell="lstm" nn.LSTM and nn.LSTMCell,
    the decoder's memory starting at zero), f32 weights computed in f64: the label-smoothed
    loss of a padded batch and autograd's gradient of every parameter, under the names of
    cuattn::runtime::seq2seq::Bahdanau."""
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    torch.manual_seed(2015 if cell == "gru" else 1997)
    V, E, He, Hd, A, R = 14, 4, 3, 5, 4, 6
    rnn, rnn_cell = (nn.GRU, nn.GRUCell) if cell == "gru" else (nn.LSTM, nn.LSTMCell)
    m = nn.ModuleDict({
        "emb_s": nn.Embedding(V, E, padding_idx=0),
        cell: rnn(E, He, batch_first=True, bidirectional=True),
        "init": nn.Linear(He, Hd),
        "W": nn.Linear(Hd, A),
        "U": nn.Linear(2 * He, A, bias=False),
        "emb_t": nn.Embedding(V, E, padding_idx=0),
        "cell": rnn_cell(E + 2 * He, Hd),
        "readout": nn.Linear(Hd + 2 * He + E, R),
        "out": nn.Linear(R, V),
    })
    v = nn.Parameter(torch.empty(A).uniform_(-0.5, 0.5))
    m = m.double()
    v = nn.Parameter(v.detach().double())
    names = {
        "emb_s.weight": "encoder.embedding.weight",
        "init.weight": "decoder.init.weight", "init.bias": "decoder.init.bias",
        "W.weight": "decoder.attention.W.weight", "W.bias": "decoder.attention.W.bias",
        "U.weight": "decoder.attention.U.weight",
        "emb_t.weight": "decoder.embedding.weight",
        "readout.weight": "decoder.readout.weight", "readout.bias": "decoder.readout.bias",
        "out.weight": "decoder.out.weight", "out.bias": "decoder.out.bias",
    }
    for k in ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]:
        for suffix in ["", "_reverse"]:
            names[f"{cell}.{k}_l0{suffix}"] = f"encoder.{cell}.{k}_l0{suffix}"
        names[f"cell.{k}"] = f"decoder.{cell}.{k}"
    params = dict(m.named_parameters())
    params["v"] = v
    names["v"] = "decoder.attention.v"

    # The batch of tests/train_seq2seq.rs: sources get EOS (2), targets BOS (1) before and
    # EOS after; PAD is 0 and ignored labels -100.
    pairs = [([5, 9, 7, 4], [4, 7, 9]), ([8], [6, 5, 13, 3]), ([12, 3, 6], [10])]
    B = len(pairs)
    Tx = max(len(s) for s, _ in pairs) + 1
    Ty = max(len(t) for _, t in pairs) + 1
    src = torch.zeros(B, Tx, dtype=torch.long)
    tgt_in = torch.zeros(B, Ty, dtype=torch.long)
    tgt_out = torch.full((B, Ty), -100, dtype=torch.long)
    lens = []
    for b, (s_, t_) in enumerate(pairs):
        src[b, :len(s_) + 1] = torch.tensor(s_ + [2])
        tgt_in[b, :len(t_) + 1] = torch.tensor([1] + t_)
        tgt_out[b, :len(t_) + 1] = torch.tensor(t_ + [2])
        lens.append(len(s_) + 1)
    lens_t = torch.tensor(lens)

    x = m["emb_s"](src)
    packed = pack_padded_sequence(x, lens_t, batch_first=True, enforce_sorted=False)
    out, _ = m[cell](packed)
    ann, _ = pad_packed_sequence(out, batch_first=True, total_length=Tx)
    s = torch.tanh(m["init"](ann[:, 0, He:]))
    mem = torch.zeros_like(s)  # the LSTM decoder's c_0
    keys = m["U"](ann)
    valid = torch.arange(Tx)[None, :] < lens_t[:, None]
    logits = []
    for i in range(Ty):
        e = torch.tanh(m["W"](s)[:, None, :] + keys) @ v
        alpha = torch.softmax(e.masked_fill(~valid, float("-inf")), dim=-1)
        c = (alpha[:, :, None] * ann).sum(dim=1)
        y = m["emb_t"](tgt_in[:, i])
        if cell == "gru":
            s = m["cell"](torch.cat([y, c], dim=-1), s)
        else:
            s, mem = m["cell"](torch.cat([y, c], dim=-1), (s, mem))
        t = torch.tanh(m["readout"](torch.cat([s, c, y], dim=-1)))
        logits.append(m["out"](t))
    logits = torch.stack(logits, dim=1)
    loss = F.cross_entropy(logits.reshape(-1, V), tgt_out.reshape(-1), ignore_index=-100,
                           label_smoothing=0.1)
    loss.backward()
    record = {
        "generator": f"scripts/make_fixtures.py {'bahdanau' if cell == 'gru' else 'bahdanau-lstm'}, torch {torch.__version__}, f64 autograd",
        "config": {"vocab": V, "emb": E, "enc_hidden": He, "dec_hidden": Hd, "attn": A,
                   "readout": R},
        "pairs": pairs,
        "label_smoothing": 0.1,
        "loss": loss.item(),
        "params": {names[k]: p.detach().flatten().tolist() for k, p in params.items()},
        "grads": {names[k]: p.grad.flatten().tolist() for k, p in params.items()},
    }
    if cell != "gru":
        record["config"]["cell"] = cell
    name = "bahdanau-tiny.json" if cell == "gru" else f"bahdanau-{cell}-tiny.json"
    with open(os.path.join(FIXTURES, name), "w") as f:
        json.dump(record, f)


def lstm():
    """One nn.LSTM layer (PyTorch's gate equations) over a packed batch of three sequences of
    lengths 3, 2, 1: f32 weights and inputs computed in f64; L = Σ w_out∘out (valid steps) +
    Σ w_h∘h_n + Σ w_c∘c_n and autograd's gradient of the inputs, the initial state and every
    weight (tests/train_seq2seq.rs checks cuattn's LSTM step against it)."""
    import torch.nn as nn
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    torch.manual_seed(1997)
    B, T, X, H = 3, 3, 4, 5
    lengths = [3, 2, 1]
    cell = nn.LSTM(X, H, batch_first=True).double()
    with torch.no_grad():
        for p in cell.parameters():
            p.copy_(p.float().double())
    f32 = lambda *shape: torch.randn(*shape).float().double()
    x = f32(B, T, X).requires_grad_()
    h0 = f32(1, B, H).requires_grad_()
    c0 = f32(1, B, H).requires_grad_()
    w_out, w_h, w_c = f32(B, T, H), f32(B, H), f32(B, H)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=True)
    out, (hn, cn) = cell(packed, (h0, c0))
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
    valid = torch.zeros(B, T, 1, dtype=torch.float64)
    for b, n in enumerate(lengths):
        valid[b, :n] = 1.0
    loss = (out * w_out * valid).sum() + (hn[0] * w_h).sum() + (cn[0] * w_c).sum()
    loss.backward()
    flat = lambda t: t.detach().flatten().tolist()
    record = {
        "generator": f"scripts/make_fixtures.py lstm, torch {torch.__version__}, f64 autograd",
        "batch": B, "steps": T, "input": X, "hidden": H, "lengths": lengths,
        "x": flat(x), "h0": flat(h0), "c0": flat(c0),
        "w_out": flat(w_out * valid), "w_h": flat(w_h), "w_c": flat(w_c),
        "weight_ih": flat(cell.weight_ih_l0), "weight_hh": flat(cell.weight_hh_l0),
        "bias_ih": flat(cell.bias_ih_l0), "bias_hh": flat(cell.bias_hh_l0),
        "out": flat(out), "h_n": flat(hn), "c_n": flat(cn), "loss": loss.item(),
        "grads": {
            "x": flat(x.grad), "h0": flat(h0.grad), "c0": flat(c0.grad),
            "weight_ih": flat(cell.weight_ih_l0.grad), "weight_hh": flat(cell.weight_hh_l0.grad),
            "bias_ih": flat(cell.bias_ih_l0.grad), "bias_hh": flat(cell.bias_hh_l0.grad),
        },
    }
    with open(os.path.join(FIXTURES, "lstm-tiny.json"), "w") as f:
        json.dump(record, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minilm", default=os.path.join(ROOT, "models", "all-MiniLM-L6-v2"))
    ap.add_argument("--only", choices=["all", "bert", "bert-cls", "minilm", "gpt2", "gpt2-beams", "bart", "bert-pretraining", "bert-pretrain-step", "bart-denoise-step", "bart-denoise-step-untied", "bart-saved", "finetune", "training", "attention-backward", "gpt-neo", "gpt1", "bahdanau", "bahdanau-lstm", "lstm", "adamw-no-grad"], default="all")
    ap.add_argument("--gpt2-bpe-dir", default=None,
                    help="folder with GPT-2's encoder.json and vocab.bpe (tiktoken-rs assets)")
    args = ap.parse_args()
    os.makedirs(FIXTURES, exist_ok=True)
    torch.set_num_threads(1)
    if args.only in ("all", "bert"):
        tiny_bert()
    if args.only in ("all", "bert", "bert-cls"):
        tiny_bert_cls()
    if args.only in ("all", "minilm"):
        minilm(args.minilm)
    if args.only in ("all", "gpt2"):
        tiny_gpt2(find_gpt2_bpe_dir(args.gpt2_bpe_dir))
    if args.only in ("all", "gpt2", "gpt2-beams"):
        gpt2_beams(find_gpt2_bpe_dir(args.gpt2_bpe_dir))
    if args.only in ("all", "bart"):
        tiny_bart()
    if args.only in ("all", "bart", "bart-denoise-step"):
        bart_denoise_step()
    if args.only in ("all", "bart", "bart-denoise-step", "bart-denoise-step-untied"):
        bart_denoise_step_untied()
    if args.only == "bart-saved":
        # Reads folders our own save_pretrained wrote (tests/train_bart_save.rs): not in "all".
        bart_saved()
    if args.only in ("all", "bert-pretraining"):
        tiny_bert_pretraining()
    if args.only in ("all", "bert-pretraining", "bert-pretrain-step"):
        bert_pretrain_step()
    if args.only in ("all", "finetune"):
        finetune_tiny()
    if args.only in ("all", "training"):
        training_ops()
    if args.only in ("all", "adamw-no-grad"):
        adamw_no_grad()
    if args.only in ("all", "attention-backward"):
        attention_backward()
    if args.only in ("all", "gpt-neo"):
        tiny_gpt_neo()
    if args.only in ("all", "gpt1"):
        tiny_gpt1()
    if args.only in ("all", "bahdanau"):
        bahdanau()
    if args.only in ("all", "bahdanau-lstm"):
        bahdanau("lstm")
    if args.only in ("all", "lstm"):
        lstm()
    print("fixtures written to", FIXTURES)


if __name__ == "__main__":
    main()
