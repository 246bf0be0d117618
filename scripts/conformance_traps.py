"""Conformance cases of what ``import`` used to get wrong (dev-only, run by
make_conformance_models.py in the side environment): a skl2onnx text pipeline, a one-logit
Optimum classifier, an fp16 graph onnxruntime cannot load, and generative exports (T5, GPT-2).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq

REVIEWS = ["a wonderful, moving film", "dull and far too long", "Great acting, GREAT story",
           "the plot made no sense", "ÉCOLE du cinéma: superbe", "I want my money back",
           "loved every minute", "boring boring boring", "a masterpiece of its kind",
           "worst film of the year", "Charming and funny", "nothing happens, ever"]
LABELS = ["positive", "negative"] * 6


def write_refused(folder: Path, case: dict[str, Any]) -> None:
    pq.write_table(pa.table({"id": np.arange(2)}), folder / "sample.parquet")
    np.savez(folder / "reference.npz")
    (folder / "case.json").write_text(json.dumps(case, indent=2) + "\n")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"{folder.name}: {size / 1e6:.2f} MB (refused)")


def skl2onnx_tfidf_text(out: Path, fresh: Any, versions: Any, write_case: Any) -> None:
    """TfidfVectorizer -> LogisticRegression on raw strings: a StringTensorType([None, 1])
    input, ZipMap, and a StringNormalizer whose default locale (en_US.UTF-8) is often absent."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import StringTensorType
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    folder = fresh(out / "skl2onnx_tfidf_text")
    corpus = REVIEWS * 3 + ["great fun", "terrible", "superbe", "awful acting"]
    labels = LABELS * 3 + ["positive", "negative", "positive", "negative"]
    model = make_pipeline(TfidfVectorizer(), LogisticRegression(C=20)).fit(corpus, labels)
    onx = to_onnx(model, initial_types=[("input", StringTensorType([None, 1]))],
                  target_opset={"": 17, "ai.onnx.ml": 3})
    onnx.save_model(onx, str(folder / "src" / "model.onnx"))
    texts = REVIEWS
    write_case(folder, {"id": np.arange(len(texts)), "text": texts},
               {"probabilities": model.predict_proba(texts).astype(np.float32),
                "label": np.array(model.predict(texts)).astype(str)},
               {"converter": "skl2onnx (a text Pipeline, defaults: ZipMap on)",
                "versions": versions("scikit-learn", "skl2onnx"), "task": "classify",
                "atol": 1e-5, "repairs": ["ZipMap", "locale", "tokenexp"],
                "trap": "a string input [None, 1] fed by a plain text column; ZipMap labels; "
                        "StringNormalizer's default locale en_US.UTF-8 absent here; "
                        "skl2onnx's ASCII word pattern (école read as cole)"})


def optimum_one_logit_classifier(out: Path, fresh: Any, versions: Any, write_case: Any,
                                 tiny_bert_config: Any, copy_tokenizer: Any,
                                 texts: list[str]) -> None:
    """A plain Optimum text-classification export with one label and no sentence-transformers
    config: transformers gives the raw logit, which is what a job must give."""
    import torch
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import BertForSequenceClassification, BertTokenizerFast

    folder = fresh(out / "optimum_one_logit_classifier")
    torch.manual_seed(23)
    work = folder / "hf"
    model = BertForSequenceClassification(tiny_bert_config(num_labels=1)).eval()
    model.save_pretrained(work)
    copy_tokenizer(work)
    shutil.rmtree(folder / "src")
    ORTModelForSequenceClassification.from_pretrained(str(work), export=True).save_pretrained(
        str(folder / "src"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if not (folder / "src" / name).exists():
            shutil.copy(work / name, folder / "src" / name)
    tokenizer = BertTokenizerFast.from_pretrained(str(work))
    shutil.rmtree(work)
    queries = [texts[i % 4] for i in range(len(texts))]
    documents = [texts[(i * 5 + 3) % len(texts)] for i in range(len(texts))]
    scores = []
    with torch.no_grad():
        for q, d in zip(queries, documents, strict=True):
            ids = tokenizer(q, d, return_tensors="pt", truncation=True)
            scores.append(float(model(**ids).logits[0, 0]))
    write_case(folder, {"id": np.arange(len(texts)), "text": queries, "text_pair": documents},
               {"score": np.asarray(scores, dtype=np.float32)},
               {"converter": "Optimum (ORTModelForSequenceClassification export, one label)",
                "versions": versions("optimum", "transformers", "torch"), "task": "rerank",
                "atol": 1e-4,
                "trap": "one logit, no sentence-transformers config: the raw logit, as "
                        "transformers gives it (no sigmoid)"})


def onnxconverter_fp16(out: Path, fresh: Any, versions: Any, source: Path) -> None:
    """onnxconverter-common's float16 conversion of a BERT classifier: onnxruntime refuses it
    at a Cast node, after a long message."""
    from onnxconverter_common import float16

    folder = fresh(out / "onnxconverter_fp16")
    model = float16.convert_float_to_float16(onnx.load(str(source / "model.onnx")),
                                             keep_io_types=True)
    onnx.save_model(model, str(folder / "src" / "model_fp16.onnx"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / "src" / name)
    write_refused(folder, {
        "converter": "onnxconverter-common (float16.convert_float_to_float16)",
        "versions": versions("onnxconverter-common"), "task": "classify",
        "refused": "model_fp16.onnx: onnxruntime", "refused_also": [
            "of node (/bert/encoder/layer.0/attention/self/Cast) does not match expected type"],
        "trap": "a graph onnxruntime cannot load, its reason at the end of a long message"})


def optimum_seq2seq_t5(out: Path, fresh: Any, versions: Any) -> None:
    """Optimum's export of a tiny T5: encoder and decoder files, no single model."""
    import torch
    from optimum.onnxruntime import ORTModelForSeq2SeqLM
    from transformers import T5Config, T5ForConditionalGeneration

    folder = fresh(out / "optimum_seq2seq_t5")
    torch.manual_seed(24)
    work = folder / "hf"
    T5ForConditionalGeneration(T5Config(vocab_size=200, d_model=16, d_kv=8, d_ff=32,
                                        num_layers=1, num_heads=2, decoder_start_token_id=0)
                               ).save_pretrained(work)
    shutil.rmtree(folder / "src")
    ORTModelForSeq2SeqLM.from_pretrained(str(work), export=True).save_pretrained(
        str(folder / "src"))
    shutil.rmtree(work)
    write_refused(folder, {
        "converter": "Optimum (ORTModelForSeq2SeqLM export)",
        "versions": versions("optimum", "transformers", "torch"), "task": "generate",
        "refused": "a text generation model", "refused_also": ["seq2seq", "encoder_model.onnx"],
        "trap": "encoder and decoder files; no task of one forward pass fits"})


def optimum_causal_gpt2(out: Path, fresh: Any, versions: Any) -> None:
    """Optimum's text-generation-with-past export of a tiny GPT-2: logits and present KV."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = fresh(out / "optimum_causal_gpt2")
    torch.manual_seed(25)
    work = folder / "hf"
    GPT2LMHeadModel(GPT2Config(vocab_size=200, n_positions=64, n_embd=16, n_layer=1,
                               n_head=2)).save_pretrained(work)
    shutil.rmtree(folder / "src")
    ORTModelForCausalLM.from_pretrained(str(work), export=True, use_cache=True).save_pretrained(
        str(folder / "src"))
    shutil.rmtree(work)
    write_refused(folder, {
        "converter": "Optimum (ORTModelForCausalLM export, text-generation-with-past)",
        "versions": versions("optimum", "transformers", "torch"), "task": "generate",
        "refused": "a text generation model", "refused_also": ["KV cache", "no tokenizer.json"],
        "trap": "logits [batch, tokens, vocab] with past_key_values inputs, saved without its "
                "tokenizer"})
