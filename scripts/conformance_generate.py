"""Conformance cases of text generation (dev-only, run by make_conformance_models.py in the
side environment):

- ``optimum_causal_llama``: a tiny Llama trained briefly on synthetic sentences so that its
  greedy continuations are decisive, exported by Optimum (``text-generation-with-past``:
  ``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.*`` in, ``logits``
  and ``present.*`` out), with what transformers' ``generate(do_sample=False)`` returns for
  each prompt alone.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "eel", "yak"]
FOODS = ["fish", "bones", "mice", "seeds", "honey", "grass", "worms", "moss"]
PLACES = ["barn", "river", "forest", "field", "hill", "cave", "lake", "garden"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve"]


def sentence(i: int) -> str:
    """A fact about an animal: each animal has its own food and place, so a prompt that names
    the animal has one right continuation."""
    a = i % len(ANIMALS)
    return f"the {ANIMALS[a]} eats {FOODS[a]} in the {PLACES[a]} ."


def counting(start: int) -> str:
    return "count " + " ".join(NUMBERS[start:])


def corpus(rng: random.Random, count: int) -> list[str]:
    texts = []
    for _ in range(count):
        texts.append(sentence(rng.randrange(len(ANIMALS))) if rng.random() < 0.7
                     else counting(rng.randrange(4)))
    return texts


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + "
                 "m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|assistant|>\n' }}{% endif %}")
SYSTEM = "be brief"


def chat_examples(rng: random.Random, count: int) -> list[list[dict[str, str]]]:
    """Conversations whose answer completes a sentence the user began (a system message in
    half of them)."""
    out = []
    for _ in range(count):
        words = sentence(rng.randrange(len(ANIMALS))).split() if rng.random() < 0.7 \
            else counting(rng.randrange(4)).split()
        cut = rng.randint(1, min(4, len(words) - 1))
        messages = [{"role": "user", "content": " ".join(words[:cut])},
                    {"role": "assistant", "content": " ".join(words[cut:])}]
        if rng.random() < 0.5:
            messages.insert(0, {"role": "system", "content": SYSTEM})
        out.append(messages)
    return out


PROMPTS = ["the cat", "the dog eats", "the fox eats mice in", "the owl", "count one two",
           "count three", "the bee eats honey", "the cow", "count", "the eel eats worms in the",
           "the yak eats", "the", "count two three four five six", "the garden"]


def generation_tokenizer(texts: list[str]) -> Any:
    """A byte-level BPE tokenizer trained on the corpus, with Llama's conventions: ``<s>``
    before each text, ``</s>`` ends a generation, and padding with ``</s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>", model_max_length=64,
                                   clean_up_tokenization_spaces=False,
                                   model_input_names=["input_ids", "attention_mask"])


def training_ids(tokenizer: Any, texts: list[str],
                 chats: list[list[dict[str, str]]]) -> list[list[int]]:
    """Plain texts with the tokenizer's <s>, and conversations rendered by the chat template
    (which writes <s>), each ended by </s>."""
    eos = tokenizer.eos_token_id
    out = [tokenizer(t)["input_ids"] + [eos] for t in texts]
    for chat in chats:
        rendered = tokenizer.apply_chat_template(chat, tokenize=False)
        out.append(tokenizer(rendered.rstrip("\n"), add_special_tokens=False)["input_ids"] + [eos])
    return out


def train_causal(model: Any, examples: list[list[int]], pad: int, steps: int, seed: int) -> None:
    import torch

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = rng.sample(examples, 32)
        width = max(len(ids) for ids in batch)
        ids = torch.tensor([b + [pad] * (width - len(b)) for b in batch])
        mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch])
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"causal step {step}: loss {loss.item():.3f}")
    model.eval()


def greedy_references(model: Any, tokenizer: Any, prompts: list[Any],
                      max_new_tokens: int) -> dict[str, list]:
    """transformers' generate, prompt by prompt: the text (special tokens skipped), the new
    tokens (the end-of-sequence token that ended it counted), and why it ended. A prompt that
    is a list of messages goes through ``apply_chat_template(add_generation_prompt=True)``."""
    import torch

    eos = tokenizer.eos_token_id
    out: dict[str, list] = {"generated": [], "finish_reason": [], "tokens_in": [],
                            "tokens_out": []}
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt") if isinstance(prompt, str) else \
            tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                          return_dict=True, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=eos)[0, enc["input_ids"].shape[1]:].tolist()
        out["generated"].append(tokenizer.decode(ids, skip_special_tokens=True))
        out["finish_reason"].append("stop" if ids and ids[-1] == eos else "length")
        out["tokens_in"].append(int(enc["input_ids"].shape[1]))
        out["tokens_out"].append(len(ids))
    return out


def trained_llama() -> tuple[Any, Any]:
    """The tiny Llama both generation cases hold (4 heads of 16: onnxruntime-genai's
    grouped-query attention needs a head size that is a multiple of 8), trained on the
    sentences and the conversations, and its tokenizer with the chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(51)
    texts = corpus(random.Random(51), 2000)
    chats = chat_examples(random.Random(52), 1000)
    tokenizer = generation_tokenizer(texts + [m["content"] for c in chats for m in c] +
                                     ["<|user|>\n<|assistant|>\n<|system|>\n"] * 50)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    train_causal(model, training_ids(tokenizer, texts, chats), tokenizer.eos_token_id, 800, 51)
    return model, tokenizer


def optimum_causal_llama(out: Path, fresh: Any, versions: Any) -> None:
    """A Llama exported by Optimum with its KV cache (text-generation-with-past)."""
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import GenerationConfig

    folder = fresh(out / "optimum_causal_llama")
    model, tokenizer = trained_llama()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id)
    work = folder / "hf"
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    shutil.rmtree(folder / "src")
    ORTModelForCausalLM.from_pretrained(str(work), export=True, use_cache=True).save_pretrained(
        str(folder / "src"))
    # The tokenizer as transformers saves it (4.5x: the chat template in chat_template.jinja).
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
        if not (folder / "src" / name).exists() and (work / name).exists():
            shutil.copy(work / name, folder / "src" / name)
    shutil.rmtree(work)
    references = greedy_references(model, tokenizer, PROMPTS, 12)
    short = greedy_references(model, tokenizer, PROMPTS, 3)
    user = [[{"role": "user", "content": p}] for p in PROMPTS]
    system = [[{"role": "system", "content": SYSTEM}, *m] for m in user]
    messages = [s if i % 2 else u for i, (u, s) in enumerate(zip(user, system, strict=True))]
    chat = greedy_references(model, tokenizer, user, 12)
    with_system = greedy_references(model, tokenizer, system, 12)
    from_messages = greedy_references(model, tokenizer, messages, 12)
    pq.write_table(pa.table({"id": np.arange(len(PROMPTS)), "prompt": PROMPTS,
                             "messages": messages}), folder / "sample.parquet")
    columns = {**{k: pa.array(v, pa.int32() if k.startswith("tokens") else pa.string())
                  for k, v in references.items()},
               "generated_short": pa.array(short["generated"], pa.string()),
               "generated_chat": pa.array(chat["generated"], pa.string()),
               "generated_system": pa.array(with_system["generated"], pa.string()),
               "generated_messages": pa.array(from_messages["generated"], pa.string())}
    pq.write_table(pa.table(columns), folder / "reference.parquet")
    (folder / "case.json").write_text(json.dumps(
        {"converter": "Optimum (ORTModelForCausalLM export, text-generation-with-past)",
         "versions": versions("optimum", "transformers", "torch"), "task": "generate",
         "job_task": {"kind": "generate", "max_new_tokens": 12}, "atol": 1e-4,
         "variants": {"generated_short": {"kind": "generate", "max_new_tokens": 3},
                      "generated_chat": {"kind": "generate", "max_new_tokens": 12,
                                         "chat": True},
                      "generated_system": {"kind": "generate", "max_new_tokens": 12,
                                           "chat": True, "system": SYSTEM},
                      "generated_messages": {"kind": "generate", "max_new_tokens": 12,
                                             "messages_column": "messages"}},
         "trap": "a KV cache carried between steps (past_key_values.* in, present.* out), "
                 "position_ids from the attention mask under left padding, <s> added by the "
                 "tokenizer's template, </s> ends a text and is counted in tokens_out, prompts "
                 "of 1 to 8 tokens batched together"}, indent=2) + "\n")
    stops = sum(r == "stop" for r in references["finish_reason"])
    print(f"{folder.name}: {stops} of {len(PROMPTS)} prompts end with </s>; "
          f"{list(zip(PROMPTS, references['generated'], strict=True))[:5]}; chat "
          f"{list(zip(PROMPTS, chat['generated'], strict=True))[:4]}; system "
          f"{with_system['generated'][:3]}")
