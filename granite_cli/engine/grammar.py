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
    the logits in place (`apply_bitmask`). Rows whose JSON is complete end with the end-of-text
    token, which the grammar then only allows.

    The host never waits for the forward pass. transformers calls logits processors once it has
    queued a step's forward: reading `input_ids` here (`.tolist()`) would wait for that forward
    to end, and the GPU would then idle while the matchers work (≈ 3 ms a step at 128 rows).
    Instead `sampled`, a stopping criterion (called right after sampling, before the next
    forward is queued), starts copying the new tokens to the host; here only that copy is waited
    for, so the matchers advance and the bitmasks fill while the GPU computes the forward. The
    bitmasks then go over from pinned memory, without a wait either.
    """

    def __init__(self, compiled, rows: int, device="cpu"):
        import torch
        import xgrammar

        self.xgrammar = xgrammar
        self.matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(rows)]
        self.batch = xgrammar.BatchGrammarMatcher()
        self.vocab_size = compiled.tokenizer_info.vocab_size
        self.live = list(range(rows))
        """Rows still inside their grammar; a row that leaves never comes back."""
        shape = xgrammar.get_bitmask_shape(rows, self.vocab_size)
        self.masks = [HostBuffer(torch.full(shape, -1, dtype=torch.int32), device) for _ in range(2)]
        """Two host bitmasks used in turn, so that one can be filled while the other may still be
        on its way. A row that is not live is all ones there: every token allowed, untouched."""
        self.flags = HostBuffer(torch.ones(rows, dtype=torch.bool), device)
        """Which rows are live, for logits wider than the vocabulary (see `apply_bitmask`)."""
        self.sampled = SampledTokens(rows, device)
        self.started = False

    def __call__(self, input_ids, scores):
        if self.started and self.live:
            self._accept(self.sampled.take(input_ids))
        self.started = True
        if not self.live:
            return scores
        self.masks.reverse()
        mask = self.masks[0]
        self.batch.batch_fill_next_token_bitmask([self.matchers[i] for i in self.live], mask.ready(), indices=self.live)
        live = self.flags.send(scores.device) if scores.shape[1] > self.vocab_size else None
        apply_bitmask(scores, mask.send(scores.device), self.vocab_size, live)
        return scores

    def _accept(self, tokens: list[int]) -> None:
        """The live rows' matchers take their newest tokens; the rows that complete leave, and
        their bitmasks become all ones."""
        live = self.live
        self.xgrammar.BatchGrammarMatcher.batch_accept_token(
            [self.matchers[i] for i in live], [tokens[i] for i in live]
        )
        self.live = [i for i in live if not self.matchers[i].is_terminated()]
        gone = sorted(set(live) - set(self.live))
        if gone:
            for mask in self.masks:
                mask.ready()[gone] = -1
            self.flags.ready()[gone] = False


class SampledTokens:
    """A `generate` stopping criterion that stops nothing: it starts copying each step's new
    tokens to the host, where the grammar's matchers read them at the next logits step.

    transformers calls stopping criteria right after a token is sampled and appended to
    `input_ids`, and before it queues the next forward (generation/utils.py, `_sample`), so the
    copy runs on the device as soon as sampling is done, ahead of that forward.
    """

    def __init__(self, rows: int, device):
        import torch

        self.tokens = HostBuffer(torch.zeros(rows, dtype=torch.long), device)
        self.pending = False
        self.never = None

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.tokens.receive(input_ids[:, -1])
        self.pending = True
        if self.never is None:
            self.never = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return self.never

    def take(self, input_ids) -> list[int]:
        """The tokens sampled at the last step, one per row. Without a copy under way (this
        criterion was not given to `generate`) they are read from `input_ids`, which waits for
        all the device's work queued so far."""
        if not self.pending:
            return input_ids[:, -1].tolist()
        self.pending = False
        return self.tokens.ready().tolist()


class HostBuffer:
    """A tensor on the host that goes to and comes from one device without the host waiting
    for the device's queue: on CUDA, pinned, with an event after each copy; elsewhere a plain
    tensor and plain copies (an MPS or CPU copy to the host is done when the call returns).

    Pinned memory is what lets a CUDA copy run while the host goes on (from pageable memory it
    goes through a staging buffer in step with the host); the event says when the buffer may be
    read again (after a copy in) or written again (after a copy out)."""

    def __init__(self, tensor, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.tensor = tensor.pin_memory() if self.cuda else tensor
        self.done = torch.Event(device=torch.device(device), blocking=True) if self.cuda else None
        self.busy = False

    def receive(self, source) -> None:
        """Start copying `source`, on the device, into the buffer."""
        self._wait()
        self.tensor.copy_(source, non_blocking=self.cuda)
        self._mark()

    def ready(self):
        """The buffer, once its last copy is done: the one into it has arrived, or the one out
        of it has read it (and it may be written again)."""
        self._wait()
        return self.tensor

    def send(self, device):
        """The buffer's copy on `device`, under way: what the device does next on this stream
        sees it whole."""
        copy = self.tensor.to(device, non_blocking=self.cuda)
        self._mark()
        return copy

    def _wait(self) -> None:
        if self.busy:
            self.done.synchronize()
            self.busy = False

    def _mark(self) -> None:
        if self.cuda:
            self.done.record()
            self.busy = True


def apply_bitmask(scores, bitmask, vocab_size: int, live=None) -> None:
    """Set to -inf, in place, the logits of every token a row's bitmask forbids (bit i of word
    j allows token 32 j + i); a row whose bitmask is all ones is left as it is. Logits beyond the
    vocabulary go to -inf in the rows `live` (a bool per row, on the logits' device) marks.

    Plain tensor operations on the logits' own device over the whole batch, with no index built
    on the host (a tensor made from a Python list is a copy the host waits for): xgrammar's fused
    kernels need Triton or nvcc, and a C compiler on the host at first use, and Triton reads the
    properties of GPU 0 whatever the device; this needs nothing and takes microseconds against a
    decode step.
    """
    import torch

    shifts = torch.arange(32, device=scores.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab_size]
    if allowed.shape[1] < vocab_size:  # (a vocabulary that is not a multiple of 32 is padded)
        raise ValueError(f"bitmask covers {allowed.shape[1]} tokens, vocabulary has {vocab_size}")
    scores[:, :vocab_size].masked_fill_(~allowed, float("-inf"))
    if scores.shape[1] > vocab_size:
        scores[:, vocab_size:].masked_fill_(live.unsqueeze(1), float("-inf"))
