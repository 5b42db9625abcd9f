"""Constrained decoding for --schema / --json-object: xgrammar matchers, one per row of a batch."""

from __future__ import annotations


def compile_schema(tokenizer_info, schema_text: str):
    """The schema compiled against a vocabulary, whitespace-free."""
    import xgrammar

    from ..schema import SEPARATORS

    compiler = xgrammar.GrammarCompiler(tokenizer_info)
    return compiler.compile_json_schema(schema_text, any_whitespace=False, separators=SEPARATORS)


def tokenizer_info(tokenizer, vocab_size: int, stop_ids: set[int]):
    """What xgrammar needs of the tokenizer; `vocab_size` is the logits' width, which can exceed
    the tokenizer's own."""
    import xgrammar

    return xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids))


class GrammarMask:
    """A `generate` logits processor holding one xgrammar matcher per row of the batch.

    Each step: the rows still inside their grammar accept the token they just produced, their
    allowed-token bitmasks are filled in one multi-threaded call, and the masks are applied to
    the logits in place (a fused kernel on CUDA). Rows whose JSON is complete end with the
    end-of-text token, which the grammar then only allows.
    """

    def __init__(self, compiled, rows: int):
        import xgrammar

        self.xgrammar = xgrammar
        self.matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(rows)]
        self.batch = xgrammar.BatchGrammarMatcher()
        self.vocab_size = compiled.tokenizer_info.vocab_size
        self.bitmask = xgrammar.allocate_token_bitmask(rows, self.vocab_size)
        self.started = False

    def __call__(self, input_ids, scores):
        live = [i for i, matcher in enumerate(self.matchers) if not matcher.is_terminated()]
        if self.started and live:
            last = input_ids[:, -1].tolist()
            self.xgrammar.BatchGrammarMatcher.batch_accept_token(
                [self.matchers[i] for i in live], [last[i] for i in live]
            )
            live = [i for i in live if not self.matchers[i].is_terminated()]
        self.started = True
        if not live:
            return scores
        self.batch.batch_fill_next_token_bitmask([self.matchers[i] for i in live], self.bitmask, indices=live)
        masked = scores if scores.device.type in ("cuda", "cpu") else scores.to("cpu")
        self.xgrammar.apply_token_bitmask_inplace(
            masked, self.bitmask.to(masked.device, non_blocking=True), vocab_size=self.vocab_size, indices=live
        )
        return masked.to(scores.device)
