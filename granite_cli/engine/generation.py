"""The device side of a batch: one `generate` call over prepared inputs, and its tokens turned
into answers (or streamed as text while they come)."""

from __future__ import annotations

from typing import TextIO

from ..errors import OutputError
from . import Answer, EngineOptions, GenerationSettings, devices, grammar


class Generator:
    """Runs `generate` on a model with the decoding, cache and grammar each batch asks for."""

    def __init__(self, model, tokenizer, options: EngineOptions):
        self.model = model
        self.tokenizer = tokenizer
        self.options = options
        self.device = model.device
        self.dtype = model.dtype
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.grammars: dict[str, object] = {}
        self.seeded_for: GenerationSettings | None = None

    def run(self, inputs, settings: GenerationSettings, stream: TextIO | None = None) -> list[Answer]:
        """One `generate` over prepared inputs; answers in the order of their rows."""
        import torch

        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        if settings.seed is not None and settings is not self.seeded_for:  # once per run (its settings)
            devices.seed(settings.seed)
            self.seeded_for = settings
        kwargs = self._decoding(settings, rows=inputs["input_ids"].shape[0])
        if stream is not None:
            kwargs["streamer"] = TextStream(self.tokenizer, stream)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **kwargs)
        prompt_length = inputs["input_ids"].shape[1]
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        rows = output[:, prompt_length:].tolist()
        return [self._answer(row, tokens) for row, tokens in zip(rows, prompt_tokens, strict=True)]

    def _decoding(self, settings: GenerationSettings, rows: int) -> dict:
        """`generate`'s keyword arguments for these settings."""
        kwargs: dict = {
            "max_new_tokens": settings.max_new_tokens,
            "pad_token_id": self.model.generation_config.pad_token_id,
        }
        if settings.min_new_tokens:
            kwargs["min_new_tokens"] = settings.min_new_tokens
        if settings.temperature > 0:
            kwargs.update(do_sample=True, temperature=settings.temperature)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self._static_cache():
            # A preallocated cache: no per-step concatenation of the whole KV cache, and the
            # grouped K/V heads are read in place (transformers packs GQA for one-token steps).
            kwargs.update(cache_implementation="static", disable_compile=not self.options.compile)
        if settings.schema is not None:
            kwargs["logits_processor"] = [grammar.GrammarMask(self._grammar(settings.schema.text), rows)]
        return kwargs

    def _grammar(self, schema_text: str):
        """The schema compiled against this model's vocabulary, once per schema."""
        if schema_text not in self.grammars:
            vocab_size = self.model.get_output_embeddings().weight.shape[0]
            info = grammar.tokenizer_info(self.tokenizer, vocab_size, self.eos_ids)
            self.grammars[schema_text] = grammar.compile_schema(info, schema_text)
        return self.grammars[schema_text]

    def _static_cache(self) -> bool:
        if self.options.cache == "auto":
            return self.device.type == "cuda"
        return self.options.cache == "static"

    def _answer(self, tokens: list[int], prompt_tokens: int) -> Answer:
        end = next((i for i, token in enumerate(tokens) if token in self.eos_ids), None)
        kept = tokens if end is None else tokens[:end]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Answer(text.strip(), int(prompt_tokens), len(kept), "length" if end is None else "stop", tuple(kept))


class TextStream:
    """A `generate` streamer that writes decoded text to a stream as tokens arrive.

    Decodes the whole answer so far and writes only the new suffix, holding back an incomplete
    UTF-8 sequence, which is what transformers' TextStreamer does; unlike it, this one writes
    to any stream and stops at the end-of-text token.
    """

    def __init__(self, tokenizer, out: TextIO, label: str = "stdout"):
        self.tokenizer = tokenizer
        self.out = out
        self.label = label
        self.tokens: list[int] = []
        self.written = 0
        self.prompt_seen = False
        self.done = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        if self.done:
            return
        for token in value.reshape(-1).tolist():
            if token == self.tokenizer.eos_token_id:
                self.done = True
                break
            self.tokens.append(token)
        # Whitespace at either end is held back, so the streamed text equals the stored answer.
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip()
        if text.endswith("\ufffd"):
            return
        if len(text) > self.written:
            self._write(text[self.written :])
            self.written = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip()
        self._write(text[self.written :])

    def _write(self, text: str) -> None:
        """A failed write is the output's failure (disk full, reader gone), not generation's."""
        try:
            self.out.write(text)
            self.out.flush()
        except OSError as exc:
            raise OutputError(self.label, exc) from None
