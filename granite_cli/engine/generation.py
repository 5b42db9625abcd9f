"""The device side of a batch: one `generate` call over prepared inputs, and its tokens turned
into answers (or streamed as text while they come).

What keeps a GPU full and its memory for the KV cache:
- the pictures are encoded before `generate`, and only what the language model reads (the
  projected features) goes in; the vision tower's hidden states (all its layers, ~47 MB a tile in
  bf16) are gone before the first decode step, and the features themselves once the prefill
  has read them (`FreeAfterPrefill`);
- the prefill runs one row at a time, unpadded (`prefill_rows`), where the model allows it: a row
  alone needs no attention mask, so the causal (flash) kernel runs, and its activations are one
  row's, whatever the batch; else in chunks of `prefill_chunk` tokens (tokens stay identical);
- a static cache, when asked for, is sized to this batch: no cache grows over a run.
"""

from __future__ import annotations

import contextlib
from typing import TextIO

from ..errors import OutputError
from . import Answer, EngineOptions, GenerationSettings, Streams, devices, grammar, memory, row_streams

#: Model types whose picture features come one per picture (`pooler_output`), so that each row's
#: can be read alone (`prefill_rows`). Granite Vision 4's deepstack features are per layer.
ROW_PREFILL = {"llava_next"}


class Generator:
    """Runs `generate` on a model with the decoding, cache and grammar each batch asks for."""

    def __init__(self, model, tokenizer, options: EngineOptions, prefill_chunk: int | None):
        self.model = model
        self.tokenizer = tokenizer
        self.options = options
        self.prefill_chunk = prefill_chunk
        self.device = model.device
        self.dtype = model.dtype
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.grammars: dict[str, object] = {}
        self.seeded_for: GenerationSettings | None = None
        self.sampler: devices.SeededStream | None = None
        self.pad_id = model.generation_config.pad_token_id
        self.by_rows = options.prefill == "rows" and model.config.model_type in ROW_PREFILL
        """Whether prompts are read one row at a time (`prefill_rows`)."""

    def run(self, inputs, settings: GenerationSettings, streams: Streams = None) -> list[Answer]:
        """One `generate` over prepared inputs, which it takes (empties): the pixels are freed as
        soon as the vision tower has read them. Answers come in the order of the rows; each row
        with a stream (see `Engine.run`) is written there while it comes."""
        import torch

        with devices.current(self.device), self._random(settings), torch.inference_mode():
            input_ids = inputs.pop("input_ids").to(self.device)
            attention_mask = inputs.pop("attention_mask").to(self.device)
            features = self.encode(inputs)
            cache = self._cache(input_ids.shape, settings)
            if self.by_rows:
                cache = prefill_rows(self.model, input_ids, attention_mask, features, cache)
                features = None  # read, and freed
            kwargs = self._decoding(settings, input_ids.shape, features, cache)
            outs = row_streams(streams, input_ids.shape[0])
            if any(out is not None for out in outs):
                kwargs["streamer"] = RowStreams(
                    [TextStream(self.tokenizer, out, self.eos_ids) if out is not None else None for out in outs]
                )
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        prompt_tokens = attention_mask.sum(dim=1).tolist()
        rows = output[:, input_ids.shape[1] :].tolist()
        looped = next((c.cycles for c in kwargs.get("stopping_criteria", ()) if isinstance(c, RepetitionStop)), None)
        return [
            self._answer(row, tokens, looped[index] if looped is not None else 0)
            for index, (row, tokens) in enumerate(zip(rows, prompt_tokens, strict=True))
        ]

    def _random(self, settings: GenerationSettings):
        """The random stream a batch samples from: with --seed, one seeded once per run (its
        settings) and continued batch after batch; else the process's own."""
        if settings.seed is None or settings.temperature <= 0:
            return contextlib.nullcontext()
        if settings is not self.seeded_for:
            self.seeded_for, self.sampler = settings, devices.SeededStream(settings.seed, self.device)
        return self.sampler.active()

    def encode(self, inputs):
        """The pictures (taken out of `inputs`) through the vision tower and projector, keeping
        only what the language model reads (projected features; deepstack features for Granite
        Vision 4): the tower's hidden states die here, before any decode step. The tower sees at
        most `memory.ENCODE_TILES` tiles a call (it keeps every layer's hidden states, ~47 MB a
        tile in bf16), so encoding costs the same memory whatever the batch."""
        pixels, sizes = inputs.pop("pixel_values"), inputs.pop("image_sizes")
        image_rows = inputs.pop("image_rows", None)  # (a picture several rows ask about: encoded once)
        # 4.x's deepstack features come per layer, not per picture: there, one picture a row.
        if image_rows is not None and self.model.config.model_type not in ROW_PREFILL:
            pixels, sizes, image_rows = pixels[image_rows], sizes[image_rows], None
        step = max(1, memory.ENCODE_TILES // pixels.shape[1])
        kept: dict[str, list] = {}
        outputs = None
        for start in range(0, pixels.shape[0], step):
            outputs = self.model.base_model.get_image_features(
                pixel_values=pixels[start : start + step].to(self.device, self.dtype),
                image_sizes=sizes[start : start + step].to(self.device),
                return_dict=True,
            )
            for name in ("pooler_output", "deepstack_features"):  # per picture: lists that join
                if outputs.get(name) is not None:
                    kept.setdefault(name, []).extend(outputs.get(name))
        rows = image_rows.tolist() if image_rows is not None else None
        if rows is not None and rows != list(range(len(rows))):
            kept = {name: [pictures[row] for row in rows] for name, pictures in kept.items()}
        return type(outputs)(**kept)

    def _cache(self, shape, settings: GenerationSettings):
        """The batch's KV cache: static (sized to this batch) when asked for, else dynamic."""
        from transformers import DynamicCache, StaticCache

        if self.options.cache == "static":
            # (it takes the language model's part of the config itself)
            return StaticCache(config=self.model.config, max_cache_len=shape[1] + settings.max_new_tokens)
        return DynamicCache(config=self.model.config)

    def _decoding(self, settings: GenerationSettings, shape, features, cache) -> dict:
        """`generate`'s keyword arguments for these settings and this batch; `features`: the
        pictures' features for a prefill `generate` runs itself (None: the cache holds it)."""
        rows, length = shape
        kwargs: dict = {
            "max_new_tokens": settings.max_new_tokens,
            "pad_token_id": self.pad_id,
            "cache": cache,
            "logits_processor": [],
            # A static cache would make transformers compile the decode step behind our back (and
            # again for each batch's own shape): never without being asked.
            "disable_compile": True,
        }
        if features is not None:
            kwargs["mm_encoder_outputs"] = {"image": features}
            kwargs["logits_processor"].append(FreeAfterPrefill(features))
            if self.prefill_chunk and features.get("pooler_output") is not None:  # what transformers can chunk
                kwargs["prefill_chunk_size"] = self.prefill_chunk
        if settings.repetition_stop:
            kwargs["stopping_criteria"] = [RepetitionStop(rows, length, self.eos_ids)]
        if settings.min_new_tokens:
            kwargs["min_new_tokens"] = settings.min_new_tokens
        if settings.temperature > 0:
            kwargs.update(do_sample=True, temperature=settings.temperature)
        else:  # greedy, also for a checkpoint whose generation config samples by default
            kwargs["do_sample"] = False
        if settings.schema is not None:
            mask = grammar.GrammarMask(self._grammar(settings.schema.text), rows, self.device)
            kwargs["logits_processor"].insert(0, mask)
            # called after each sampling, before the next forward: starts the tokens' copy to the host
            kwargs.setdefault("stopping_criteria", []).append(mask.sampled)
        return kwargs

    def _grammar(self, schema_text: str):
        """The schema compiled against this model's vocabulary, once per schema."""
        if schema_text not in self.grammars:
            vocab_size = self.model.get_output_embeddings().weight.shape[0]
            info = grammar.tokenizer_info(self.tokenizer, vocab_size, self.eos_ids)
            self.grammars[schema_text] = grammar.compile_schema(info, schema_text)
        return self.grammars[schema_text]

    def _answer(self, tokens: list[int], prompt_tokens: int, cycle: int) -> Answer:
        """A row's answer: up to its end-of-text token; a row stopped in a loop (`cycle` tokens
        repeated) keeps one turn of the loop, and says so."""
        if cycle:
            kept = _unlooped(tokens, self.pad_id, cycle)
            reason = "repetition"
        else:
            end = next((i for i, token in enumerate(tokens) if token in self.eos_ids), None)
            kept = tokens if end is None else tokens[:end]
            reason = "length" if end is None else "stop"
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Answer(text.strip(), int(prompt_tokens), len(kept), reason, tuple(kept))


def prefill_rows(model, input_ids, attention_mask, features, cache):
    """Fill `cache` with every prompt of the batch but its last token, one row at a time and
    unpadded, and return it; `generate` then reads the last tokens as its first step.

    Why: the left padding of a batch needs an attention mask, and with a mask no flash kernel
    runs (SDPA falls back to its memory-efficient or math kernel; the prefill of 64 pages took
    9.2 s on an H200, `benchmarks/attn-h200.md`). A row alone needs no mask: the causal kernel
    runs, and its activations are one row's whatever the batch. Each row's keys and values go
    to its place in the batch's cache, right-aligned as its padding puts them; the padding's
    slots stay zero, hidden by the attention mask as before. Positions are the row's own (0 at
    its first token), as `generate` counts them from the attention mask. The row's picture
    features are freed once read.
    """
    from transformers import DynamicCache

    rows, length = input_ids.shape
    pictures = features.pooler_output  # one picture a row, in row order
    for row, tokens in enumerate(attention_mask.sum(dim=1).tolist()):
        own = DynamicCache(config=model.config)
        picture = type(features)(pooler_output=[pictures[row]])
        model.base_model(
            input_ids=input_ids[row : row + 1, length - tokens : length - 1],
            mm_encoder_outputs={"image": picture},
            cache=own,  # (a cache given is filled, whatever the config's use_cache)
        )
        pictures[row] = picture = None  # read: freed (it may share its storage with the next row's)
        for layer, written in zip(cache.layers, own.layers, strict=True):
            if not layer.is_initialized:
                _allocate(layer, written, rows, length - 1)
            layer.keys[row, :, length - tokens : length - 1] = written.keys[0]
            layer.values[row, :, length - tokens : length - 1] = written.values[0]
    for layer in cache.layers:
        if layer.get_max_length() >= 0:  # a static layer counts what it holds
            layer.cumulative_length.fill_(length - 1)
    return cache


def _allocate(layer, like, rows: int, length: int) -> None:
    """A cache layer's tensors for `rows` rows, shaped as `like`'s (one row's): a static layer
    allocates its own (its full length), a dynamic one holds exactly the prompts."""
    keys, values = like.keys, like.values
    layer.lazy_initialization(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))
    if layer.get_max_length() < 0:
        layer.keys = keys.new_zeros((rows, keys.shape[1], length, keys.shape[3]))
        layer.values = values.new_zeros((rows, values.shape[1], length, values.shape[3]))


#: A row stops as looping when its last tokens are one cycle of 1 to MAX_CYCLE tokens repeated
#: REPEATS times, and at least MIN_SPAN tokens long: a short cycle must repeat more (a single
#: token 32 times, two 16 times), so that a wide table's `|---|---|` is text, not a loop.
MAX_CYCLE = 32
REPEATS = 4
MIN_SPAN = 32


def repeats(cycle: int) -> int:
    """Turns of a cycle of this length that make a loop."""
    return max(REPEATS, -(-MIN_SPAN // cycle))


class RepetitionStop:
    """A `generate` stopping criterion: a row whose newest tokens repeat one cycle (of 1 to
    MAX_CYCLE tokens; see `repeats`) is done, the other rows go on untouched (transformers pads
    finished rows; their tokens are no input to anyone else's). Granite models do fall into such
    loops, and a loop would otherwise run to --max-new-tokens, at full cost, for nothing.

    One batched test a step, on the device and without waiting for it: for each cycle length c
    and its turns r (`repeats`), the last (r-1)c tokens equal those c before them exactly when
    the last rc tokens are one cycle r times. The shortest cycle found is the row's; rows that already ended (an
    end-of-text token, then padding) are not looping."""

    def __init__(self, rows: int, prompt_length: int, eos_ids: set[int]):
        self.rows = rows
        self.prompt_length = prompt_length
        self.eos_ids = sorted(eos_ids)
        self.found = None
        """Per row, on the device: the cycle length it stopped on (0: it did not)."""

    @property
    def cycles(self) -> list[int]:
        return [0] * self.rows if self.found is None else self.found.tolist()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        new = input_ids[:, self.prompt_length :]
        found = torch.zeros_like(new[:, 0])  # (on the tokens' device, as everything here)
        for cycle in range(MAX_CYCLE, 0, -1):  # the shortest cycle wins
            span = (repeats(cycle) - 1) * cycle
            if new.shape[1] < span + cycle:
                continue
            same = (new[:, -span:] == new[:, -span - cycle : -cycle]).all(dim=1)
            found = torch.where(same, cycle, found)
        ended = torch.stack([new == eos for eos in self.eos_ids]).any(dim=0).any(dim=1)
        found = torch.where(ended, 0, found)
        self.found = found if self.found is None else torch.where(self.found > 0, self.found, found)
        return found > 0


def _unlooped(tokens: list[int], pad_id, cycle: int) -> list[int]:
    """A looping row's tokens with the loop's turns after the first dropped (and the padding
    after it)."""
    end = len(tokens)
    while end and tokens[end - 1] == pad_id:
        end -= 1
    end -= (repeats(cycle) - 1) * cycle
    return tokens[:end]


class FreeAfterPrefill:
    """A `generate` logits processor that frees the picture features once the prefill has read
    them: `generate` keeps them in its arguments until it returns, but never reads them again."""

    def __init__(self, features) -> None:
        self.tensors = list(_tensors(features))

    def __call__(self, input_ids, scores):
        for tensor in self.tensors:
            tensor.untyped_storage().resize_(0)
        self.tensors.clear()
        return scores


def _tensors(value):
    """Every tensor in a (nested) model output, list or tuple."""
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


class RowStreams:
    """A `generate` streamer for a batch: each row's tokens go to that row's own `TextStream`
    (None: a row nobody streams). `generate` hands every streamer the prompts first, then each
    step's tokens, one a row."""

    def __init__(self, rows: list[TextStream | None]):
        self.rows = rows

    def put(self, value) -> None:
        for row, stream in zip(value, self.rows, strict=True):
            if stream is not None:
                stream.put(row)

    def end(self) -> None:
        for stream in self.rows:
            if stream is not None:
                stream.end()


class TextStream:
    """A `generate` streamer that writes decoded text to a stream as tokens arrive, the same
    text the stored answer holds: it stops at the first of `eos_ids`, where the answer ends too,
    and never writes leading whitespace nor, until more text follows, trailing whitespace (the
    answer is stripped).

    Each step decodes only the newest tokens, as vLLM's `detokenize_incrementally` does, so an
    answer costs linear work, not the square of its length: `tokens[prefix:read]` (text already
    passed on) and `tokens[prefix:]` are decoded, and what the second adds is the new text. The
    window starts one piece early because a token's text can depend on the one before it (a
    decoder that drops the leading space of the first token, say). New text that ends in an
    incomplete UTF-8 sequence ("\ufffd") is held back until its character is whole.

    A tokenizer whose decoding rewrites text already decoded once more tokens follow (the new
    window's text does not begin with the old) is not trusted again: nothing more is written
    until `end`, which writes what is missing from one full decode of the answer. If the stream
    already shows text the answer no longer has (text written cannot be taken back), `end`
    writes the answer whole on a line of its own, so that the last line is the stored answer.
    Granite's byte-level BPE never rewrites (transformers skips `clean_up_tokenization_spaces`
    for BPE).
    """

    def __init__(self, tokenizer, out: TextIO, eos_ids: set[int], label: str = "stdout"):
        self.tokenizer = tokenizer
        self.out = out
        self.eos_ids = eos_ids
        self.label = label
        self.tokens: list[int] = []
        self.prefix = 0
        """Where the decoded window starts: the first token of the last piece passed on."""
        self.read = 0
        """Tokens before this one have had their text passed on (written or held)."""
        self.shown: list[str] = []
        """What was written, in pieces."""
        self.held = ""
        """Trailing whitespace passed on but not written: written before the next text."""
        self.trusted = True
        self.prompt_seen = False
        self.done = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        if self.done:
            return
        for token in value.reshape(-1).tolist():
            if token in self.eos_ids:
                self.done = True
                break
            self.tokens.append(token)
        if self.trusted:
            self._advance()

    def _advance(self) -> None:
        """Pass on the text the tokens since `read` add, if it is whole."""
        before = self._decode(self.tokens[self.prefix : self.read])
        after = self._decode(self.tokens[self.prefix :])
        if after.endswith("\ufffd"):  # a character still incomplete
            return
        if not after.startswith(before):  # the new tokens changed text decoded before them
            self.trusted = False
            return
        if len(after) > len(before):  # (tokens that decode to nothing wait in the window)
            self.prefix, self.read = self.read, len(self.tokens)
            self._pass_on(after[len(before) :])

    def _pass_on(self, text: str) -> None:
        """Write new text, but no whitespace before the first text, and whitespace at its end
        only once more text follows."""
        text = self.held + text
        if not self.shown:
            text = text.lstrip()
        body = text.rstrip()
        self.held = text[len(body) :]
        if body:
            self._write(body)
            self.shown.append(body)

    def end(self) -> None:
        """Write what the stream still owes the answer: one full decode, stripped."""
        answer = self._decode(self.tokens).strip()
        shown = "".join(self.shown)
        if answer.startswith(shown):
            rest = answer[len(shown) :]
        else:
            rest = "\n" + answer
        if rest:
            self._write(rest)

    def _decode(self, tokens: list[int]) -> str:
        """Tokens' text as the stored answer decodes them."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _write(self, text: str) -> None:
        """A failed write is the output's failure (disk full, reader gone), not generation's."""
        try:
            self.out.write(text)
            self.out.flush()
        except OSError as exc:
            raise OutputError(self.label, exc) from None
