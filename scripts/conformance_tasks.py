"""Conformance cases of the task families (dev-only, run by make_conformance_models.py in the
side environment): token classifiers with a WordPiece and a byte-level BPE tokenizer, briefly
trained on synthetic sentences so that their outputs are decisive, exported by Optimum, with
what ``transformers.pipeline("token-classification")`` returns for every aggregation strategy.
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

NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
PEOPLE = ["Anna Schmidt", "José García", "Seán O'Brien", "Zoë Dupont", "Li Wei", "Mary-Jane Watson",
          "Björn Åkesson", "Chloé Lefèvre", "Tom", "Ayşe Yılmaz", "Jean-Luc Picard", "Ana"]
PLACES = ["Zürich", "New York", "São Paulo", "Berlin", "Kraków", "Reykjavík", "Paris",
          "Los Angeles", "Düsseldorf", "Oslo", "Cape Town", "Malmö"]
ORGS = ["Acme Corp", "Nestlé", "Deutsche Bahn", "OpenStreetMap Foundation", "Siemens AG",
        "the Red Cross", "Café Müller", "IBM", "Banco do Brasil", "Volvo"]
TEMPLATES = ["{PER} moved to {LOC} last year.", "{PER} works for {ORG} in {LOC}.",
             "Yesterday {ORG} hired {PER}.", "{LOC} is where {PER} met {PER}.",
             "The office of {ORG}, near {LOC}, opened today!", "Did {PER} call {ORG}?",
             "{ORG} ({LOC}) reported profits; {PER} was pleased.", "{PER}: \"{LOC} again?\"",
             "We flew from {LOC} to {LOC} with {PER}.", "nothing to see here, really."]
NER_TEXTS = ["Zoë Dupont moved to Zürich last year.", "José García works for Nestlé in São Paulo.",
             "Seán O'Brien met Mary-Jane Watson in Kraków.", "Yesterday Café Müller hired Ana.",
             "Did Björn Åkesson call Siemens AG?", "nothing to see here, really.",
             "Chloé Lefèvre: \"Reykjavík again?\"", "Ayşe Yılmaz flew to Malmö with Tom.",
             "The office of Deutsche Bahn, near Düsseldorf, opened today!",
             "Éric and Li Wei visited Los Angeles.", "IBM", "Oslo"]
LONG_TEXTS = [" ".join(random.Random(seed).choice(TEMPLATES) for _ in range(9))
              for seed in (1, 2)]


def synthetic_sentences(count: int, seed: int) -> list[list[tuple[str, str]]]:
    """Sentences as (word, BIO label) lists, words split on spaces."""
    rng = random.Random(seed)
    fill = {"PER": PEOPLE, "LOC": PLACES, "ORG": ORGS}
    sentences = []
    for _ in range(count):
        words: list[tuple[str, str]] = []
        for piece in rng.choice(TEMPLATES).split(" "):
            kind = next((k for k in fill if "{" + k + "}" in piece), None)
            if kind is None:
                words.append((piece, "O"))
                continue
            before, after = piece.split("{" + kind + "}")
            names = rng.choice(fill[kind]).split(" ")
            for i, name in enumerate(names):
                word = (before if i == 0 else "") + name + (after if i == len(names) - 1 else "")
                words.append((word, ("B-" if i == 0 else "I-") + kind))
        sentences.append(words)
    return sentences


def fill_long_texts() -> list[str]:
    rng = random.Random(5)
    out = []
    for text in LONG_TEXTS:
        for kind, pool in (("PER", PEOPLE), ("LOC", PLACES), ("ORG", ORGS)):
            while "{" + kind + "}" in text:
                text = text.replace("{" + kind + "}", rng.choice(pool), 1)
        out.append(text)
    return out


def train_token_classifier(model: Any, tokenizer: Any, steps: int, seed: int,
                           lr: float = 3e-3) -> None:
    """A few hundred steps of Adam on synthetic sentences: every sub-token gets its word's
    label (I- after the first), special tokens are ignored."""
    import torch

    torch.manual_seed(seed)
    label_id = {name: i for i, name in enumerate(NER_LABELS)}
    sentences = synthetic_sentences(2000, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        batch = sentences[(step * 32) % len(sentences):][:32]
        texts = [" ".join(w for w, _ in s) for s in batch]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=64,
                        return_offsets_mapping=True, return_tensors="pt")
        labels = torch.full(enc["input_ids"].shape, -100)
        for b, sentence in enumerate(batch):
            spans, pos = [], 0
            for word, tag in sentence:
                spans.append((pos, pos + len(word), tag))
                pos += len(word) + 1
            for t, (start, end) in enumerate(enc["offset_mapping"][b].tolist()):
                if end <= start:
                    continue
                for ws, we, tag in spans:
                    if ws <= start < we:
                        inside = start > ws and tag != "O"
                        labels[b, t] = label_id["I-" + tag[2:] if inside else tag]
        inputs = {k: v for k, v in enc.items() if k != "offset_mapping"}
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    print(f"  trained {steps} steps, last loss {loss.item():.4f}")


def pipeline_entities(model: Any, tokenizer: Any, texts: list[str], strategy: str,
                      stride: int | None) -> list[list[dict[str, Any]]]:
    """transformers' token-classification pipeline, one text at a time, as plain dicts; where
    it decodes a byte-level first word as U+FFFD, the right text (the words themselves)."""
    from transformers import pipeline

    kwargs = {"stride": stride} if stride else {}
    ner = pipeline("token-classification", model=model, tokenizer=tokenizer,
                   aggregation_strategy=strategy, device=-1, **kwargs)
    rows = []
    for text in texts:
        entities = []
        for e in ner(text):
            word = str(e["word"])
            if "\ufffd" in word and "\ufffd" not in text:
                assert e["start"] == 0, (text, e)  # only a text's first word decodes so
                word = text[e["start"]:e["end"]]
            entities.append({"entity_group": str(e.get("entity_group", e.get("entity"))),
                             "score": float(e["score"]), "word": word,
                             "start": int(e["start"]), "end": int(e["end"])})
        rows.append(entities)
    return rows


ENTITY = pa.list_(pa.struct([("entity_group", pa.string()), ("score", pa.float32()),
                             ("word", pa.string()), ("start", pa.int64()), ("end", pa.int64())]))
STRATEGIES = ("simple", "none", "first", "average", "max")


def ner_case(folder: Path, model: Any, tokenizer: Any, case: dict[str, Any]) -> None:
    texts = NER_TEXTS + fill_long_texts()
    references = {}
    for strategy in STRATEGIES:
        references["entities" if strategy == "simple" else f"entities_{strategy}"] = \
            pipeline_entities(model, tokenizer, texts, strategy, None)
    for strategy in ("simple", "first"):
        references[f"entities_{strategy}_stride"] = \
            pipeline_entities(model, tokenizer, texts, strategy, 16)
    pq.write_table(pa.table({"id": np.arange(len(texts)), "text": texts}),
                   folder / "sample.parquet")
    pq.write_table(pa.table({k: pa.array(v, ENTITY) for k, v in references.items()}),
                   folder / "reference.parquet")
    variants = {f"entities_{s}": {"aggregation": s} for s in STRATEGIES if s != "simple"}
    variants.update({f"entities_{s}_stride": {"aggregation": s, "long_texts": "stride",
                                              "stride": 16} for s in ("simple", "first")})
    found = sum(len(r) for r in references["entities"])
    (folder / "case.json").write_text(json.dumps(
        {**case, "task": "token-classify", "atol": 1e-4, "variants": variants}, indent=2) + "\n")
    print(f"{folder.name}: {found} entities (simple) in {len(texts)} texts")


def label_config(config_class: Any, **extra: Any) -> Any:
    return config_class(num_labels=len(NER_LABELS), id2label=dict(enumerate(NER_LABELS)),
                        label2id={v: i for i, v in enumerate(NER_LABELS)}, **extra)


def export_token_classifier(work: Path, src: Path) -> None:
    from optimum.onnxruntime import ORTModelForTokenClassification

    ORTModelForTokenClassification.from_pretrained(str(work), export=True).save_pretrained(
        str(src))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if not (src / name).exists() and (work / name).exists():
            shutil.copy(work / name, src / name)


def optimum_ner_wordpiece(out: Path, fresh: Any, versions: Any, copy_tokenizer: Any) -> None:
    """A BERT token classifier with an uncased WordPiece tokenizer (MiniLM's vocabulary)."""
    import torch
    from transformers import BertConfig, BertForTokenClassification, BertTokenizerFast

    folder = fresh(out / "optimum_ner_wordpiece")
    torch.manual_seed(21)
    work = folder / "hf"
    work.mkdir()
    copy_tokenizer(work)
    tokenizer = BertTokenizerFast.from_pretrained(str(work), model_max_length=64)
    config = label_config(BertConfig, vocab_size=30522, hidden_size=48, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=96,
                          max_position_embeddings=128)
    model = BertForTokenClassification(config)
    train_token_classifier(model, tokenizer, 400, 21)
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    shutil.rmtree(folder / "src")
    export_token_classifier(work, folder / "src")
    ner_case(folder, model, tokenizer, {
        "converter": "Optimum (ORTModelForTokenClassification export)",
        "versions": versions("optimum", "transformers", "torch"),
        "trap": "WordPiece, uncased: words rebuilt from pieces (accents stripped, ' spaced, ## "
                "kept mid-word); I- after O starts a group; model_max_length 64 in "
                "tokenizer_config.json, windows of 64 with stride 16"})
    shutil.rmtree(work)


def optimum_ner_bpe(out: Path, fresh: Any, versions: Any) -> None:
    """A RoBERTa token classifier with a byte-level BPE tokenizer trained on the sentences."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import RobertaConfig, RobertaForTokenClassification, RobertaTokenizerFast

    folder = fresh(out / "optimum_ner_bpe")
    torch.manual_seed(22)
    work = folder / "hf"
    work.mkdir()
    corpus = [" ".join(w for w, _ in s) for s in synthetic_sentences(3000, 99)] + NER_TEXTS
    bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=True)
    bpe.train_from_iterator(corpus, vocab_size=600, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False,
                                           trim_offsets=True)
    tokenizer = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, model_max_length=64,
                                     bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                     cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                                     mask_token="<mask>")
    config = label_config(RobertaConfig, vocab_size=len(tokenizer), hidden_size=48,
                          num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                          max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                          eos_token_id=2, type_vocab_size=1)
    model = RobertaForTokenClassification(config)
    train_token_classifier(model, tokenizer, 400, 22)
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    shutil.rmtree(folder / "src")
    export_token_classifier(work, folder / "src")
    ner_case(folder, model, tokenizer, {
        "converter": "Optimum (ORTModelForTokenClassification export)",
        "versions": versions("optimum", "transformers", "torch", "tokenizers"),
        "trap": "byte-level BPE (RoBERTa): word boundaries by the pipeline's heuristic, "
                "leading spaces kept, a first word with Latin-1 letters; positions from "
                "ids != pad id; windows of 64 with stride 16"})
    shutil.rmtree(work)


# ----------------------------------------------------------------------------- zero-shot

NLI_LABELS = ["contradiction", "neutral", "entailment"]
NLI_STEPS = 1100
TOPICS = {"sports": ["football", "match", "goal", "team", "tennis", "coach"],
          "cooking": ["recipe", "oven", "soup", "bake", "kitchen", "spices"],
          "music": ["guitar", "concert", "album", "song", "band", "piano"],
          "travel": ["flight", "hotel", "passport", "beach", "train", "museum"],
          "politics": ["election", "vote", "senate", "minister", "policy", "campaign"]}
ZERO_SHOT_LABELS = ["sports", "cooking", "music", "travel"]
ZERO_SHOT_TEXTS = ["The team scored a late goal to win the match.",
                   "Bake the bread in a hot oven for twenty minutes.",
                   "Her new album has a wonderful piano song.",
                   "Our flight to the beach hotel was delayed.",
                   "The coach of the tennis team is also a great cook.",
                   "The band played a concert at the museum.",
                   "The minister called an election for next spring.",
                   "A recipe for a spicy soup from the kitchen of my grandmother.",
                   "Bring your passport for the train across the border.",
                   "football", "", "x " * 300]


def nli_pairs(count: int, seed: int) -> list[tuple[str, str, int]]:
    """(premise, hypothesis, label) pairs: a premise about one topic entails the templates
    that name it and contradicts those that name another."""
    import random

    rng = random.Random(seed)
    templates = ["This example is {}.", "This text is about {}.", "{}"]
    names = list(TOPICS)
    pairs = []
    for _ in range(count):
        topic = rng.choice(names)
        words = rng.sample(TOPICS[topic], 3) + rng.sample(["the", "a", "was", "very", "today",
                                                           "we", "and", "of", "new"], 3)
        rng.shuffle(words)
        premise = " ".join(words).capitalize() + "."
        named = topic if rng.random() < 0.4 else rng.choice(names)
        hypothesis = rng.choice(templates).format(named)
        pairs.append((premise, hypothesis, 2 if named == topic else 0))
    return pairs


def zero_shot_reference(model: Any, tokenizer: Any, texts: list[str], labels: list[str],
                        **settings: Any) -> tuple[list[str], list[float], list[list[float]]]:
    from transformers import pipeline

    classify = pipeline("zero-shot-classification", model=model, tokenizer=tokenizer, device=-1)
    top, scores, probabilities = [], [], []
    for text in texts:
        if not text:
            top.append(None)
            scores.append(None)
            probabilities.append(None)
            continue
        out = classify(text, candidate_labels=labels, **settings)
        by_label = dict(zip(out["labels"], out["scores"], strict=True))
        top.append(out["labels"][0])
        scores.append(float(out["scores"][0]))
        probabilities.append([float(by_label[label]) for label in labels])
    return top, scores, probabilities


def nli_tokenizer(pairs: list[tuple[str, str, int]]) -> Any:
    """A BERT WordPiece tokenizer (lower case, [CLS] a [SEP] b [SEP]) trained on the pairs: a
    small vocabulary that a tiny model learns within a minute."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator([t for p, h, _ in pairs[:3000] for t in (p, h)] + ZERO_SHOT_TEXTS,
                            trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=64)


def optimum_zero_shot_nli(out: Path, fresh: Any, versions: Any) -> None:
    """A BERT NLI classifier (contradiction, neutral, entailment) trained briefly on synthetic
    pairs (stopped before it saturates), exported by Optimum, with what transformers'
    zero-shot pipeline computes."""
    import torch
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import BertConfig, BertForSequenceClassification

    folder = fresh(out / "optimum_zero_shot_nli")
    torch.manual_seed(26)
    work = folder / "hf"
    work.mkdir()
    pairs = nli_pairs(20000, 26)
    tokenizer = nli_tokenizer(pairs)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=128,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        num_labels=3, id2label=dict(enumerate(NLI_LABELS)),
                        label2id={v: i for i, v in enumerate(NLI_LABELS)})
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    model.train()
    for step in range(NLI_STEPS):
        batch = pairs[(step * 64) % len(pairs):][:64]
        enc = tokenizer([p for p, _, _ in batch], [h for _, h, _ in batch], padding=True,
                        truncation="only_first", return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([y for _, _, y in batch])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    print(f"  trained {NLI_STEPS} steps, last loss {loss.item():.4f}")
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    shutil.rmtree(folder / "src")
    ORTModelForSequenceClassification.from_pretrained(str(work), export=True).save_pretrained(
        str(folder / "src"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if not (folder / "src" / name).exists():
            shutil.copy(work / name, folder / "src" / name)
    texts = ZERO_SHOT_TEXTS
    columns: dict[str, Any] = {}
    variants: dict[str, Any] = {}
    for suffix, settings in (("", {}), ("_multi", {"multi_label": True}),
                             ("_template", {"hypothesis_template": "This text is about {}."}),
                             ("_one", {"labels": ["music"]})):
        labels = settings.pop("labels", ZERO_SHOT_LABELS)
        top, scores, probabilities = zero_shot_reference(model, tokenizer, texts, labels,
                                                         **settings)
        columns[f"probabilities{suffix}"] = pa.array(probabilities, pa.list_(pa.float32()))
        if not suffix:
            columns["label"] = pa.array(top, pa.string())
            columns["score"] = pa.array(scores, pa.float32())
        else:
            task = {"labels": labels}
            if "multi_label" in settings:
                task["multi_label"] = True
            if "hypothesis_template" in settings:
                task["template"] = settings["hypothesis_template"]
            variants[f"probabilities{suffix}"] = task
    shutil.rmtree(work)
    pq.write_table(pa.table({"id": np.arange(len(texts)), "text": texts}),
                   folder / "sample.parquet")
    pq.write_table(pa.table(columns), folder / "reference.parquet")
    (folder / "case.json").write_text(json.dumps({
        "converter": "Optimum (ORTModelForSequenceClassification export, an NLI model)",
        "versions": versions("optimum", "transformers", "torch"), "task": "classify",
        "job_task": {"labels": ZERO_SHOT_LABELS}, "atol": 1e-4, "variants": variants,
        "bad_rows": {"10": "text is empty"},
        "trap": "entailment found by name (index 2), contradiction index 0; each pair encoded "
                "alone, only the text truncated (a text of 600 tokens); multi-label a softmax "
                "over [contradiction, entailment] per label; one label is multi-label"},
        indent=2) + "\n")
    print(f"{folder.name}: {len(texts)} texts x {len(ZERO_SHOT_LABELS)} labels")


# ----------------------------------------------------------------------------- SPLADE

SPLADE_TEXTS = ["the river runs to the sea", "hello world", "a short one",
                "sparse vectors keep only the words that matter",
                "the quick brown fox jumps over the lazy dog", "numbers 1 2 3",
                "tokens beyond the maximum length are cut " * 12, "ok"]


def sentence_transformers_splade(out: Path, fresh: Any, versions: Any,
                                 copy_tokenizer: Any) -> None:
    """sentence-transformers' SparseEncoder (MLMTransformer + SpladePooling, max) with its
    ONNX backend: onnx/model.onnx gives [batch, tokens, vocab] logits; the pooling is named
    in 1_SpladePooling/config.json. The MLM head's bias is lowered so that, as in a trained
    SPLADE model, a few hundred of the 30,522 dimensions are nonzero."""
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.models import MLMTransformer, SpladePooling
    from transformers import BertConfig, BertForMaskedLM

    folder = fresh(out / "sentence_transformers_splade")
    torch.manual_seed(27)
    work = folder / "hf"
    model = BertForMaskedLM(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=32,
                                       max_position_embeddings=128))
    with torch.no_grad():
        model.cls.predictions.bias.fill_(-0.25)
    model.save_pretrained(work)
    copy_tokenizer(work)
    encoder = SparseEncoder(modules=[MLMTransformer(str(work), max_seq_length=40),
                                     SpladePooling("max")])
    plain = folder / "st"
    encoder.save(str(plain))
    shutil.rmtree(folder / "src")
    SparseEncoder(str(plain), backend="onnx").save(str(folder / "src"))
    shutil.rmtree(work)
    shutil.rmtree(plain)
    dense = encoder.encode(SPLADE_TEXTS, convert_to_tensor=True).to_dense().numpy()
    rows = []
    for vector in dense:
        nonzero = np.flatnonzero(vector)
        rows.append({"indices": nonzero.astype(np.int32).tolist(),
                     "values": vector[nonzero].astype(np.float32).tolist()})
    kind = pa.struct([("indices", pa.list_(pa.int32())), ("values", pa.list_(pa.float32()))])
    pq.write_table(pa.table({"id": np.arange(len(SPLADE_TEXTS)), "text": SPLADE_TEXTS}),
                   folder / "sample.parquet")
    pq.write_table(pa.table({"sparse_embedding": pa.array(rows, kind)}),
                   folder / "reference.parquet")
    (folder / "case.json").write_text(json.dumps({
        "converter": "sentence-transformers ONNX backend (SparseEncoder, Optimum fill-mask)",
        "versions": versions("sentence-transformers", "optimum", "torch"),
        "task": "sparse-embed", "atol": 1e-4, "repairs": ["SpladePooling"],
        "trap": "[batch, tokens, 30522] MLM logits out; max pooling of log1p(relu) named in "
                "1_SpladePooling/config.json; max_seq_length 40 in tokenizer_config.json only"},
        indent=2) + "\n")
    print(f"{folder.name}: {sum(len(r['indices']) for r in rows) / len(rows):.0f} nonzero "
          "dimensions a row")
