"""The mutation check: break the product on purpose, one change at a time, and make sure the
tests named for that behaviour notice: every test paired with a change must fail with it. A test
that still passes with its behaviour broken proves nothing; this keeps every row honest.

    python3 tests/mutations.py            # every mutation (about 20 minutes on 2 cores)
    python3 tests/mutations.py --list     # what each one breaks, and which tests must catch it
    python3 tests/mutations.py --only resume-from-scratch temperature-ignored

Each mutation replaces one exact piece of product code (which must occur exactly once, so a
refactor that moves the code makes the row fail loudly until it is updated) in a copy of the
working tree, runs its tests there, and counts it caught when they fail. Not part of CI's lane:
run it after changing tests or the code they guard. Exit status 0 only if every one is caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    breaks: str
    """The behaviour (a README promise, or the row of the review's table) the change breaks."""
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    """Test node ids (relative to tests/), every one of which must fail."""


M = Mutation
MUTATIONS: list[Mutation] = [
    # ------------------------------------------------------------ the review's table
    M(
        "temperature-ignored",
        "--temperature samples (seeded: reproducibly)",
        "granite_cli/engine/generation.py",
        "        if settings.temperature > 0:\n",
        "        if False:\n",
        ("test_engine.py::test_sampling_with_a_seed_is_reproducible",),
    ),
    M(
        "model-always-loaded",
        "no model is loaded when no item is left to answer",
        "granite_cli/api.py",
        "and any(item.error is None for item in plan.todo):",
        "and True:",
        (
            "test_edge_cases.py::test_resume_with_nothing_left_does_not_load_the_model",
            "test_safety.py::test_no_model_is_loaded_when_no_item_needs_one",
        ),
    ),
    M(
        "static-cache-ignored",
        "--cache static uses a static KV cache",
        "granite_cli/engine/generation.py",
        '        if self.options.cache == "static":',
        "        if False:",
        ("test_engine.py::test_static_cache_gives_the_same_answers",),
    ),
    M(
        "json-object-never-valid",
        "--json-object answers are validated JSON objects",
        "granite_cli/schema.py",
        "        return data, None",
        '        return None, "does not match the schema (mutant)"',
        ("test_schema.py::test_json_object_mode",),
    ),
    M(
        "resume-from-scratch",
        "--resume keeps what was answered and runs only the rest",
        "granite_cli/output.py",
        "        if not self.resume:\n            check_report(",
        "        if True:\n            check_report(",
        (
            "test_reliability.py::test_markdown_report_is_rebuilt_from_its_journal_on_resume",
            "test_reliability.py::test_kill_9_then_resume_over_200_items",
        ),
    ),
    # ------------------------------------------------------------ comparisons that passed when both runs failed
    M(
        "every-generation-fails",
        "batching never changes an answer (both runs must succeed to compare)",
        "granite_cli/engine/generation.py",
        '        input_ids = inputs.pop("input_ids").to(self.device)\n',
        '        raise RuntimeError("mutant")\n',
        (
            "test_caption.py::test_output_order_is_input_order_whatever_the_batching",
            "test_engine.py::test_static_cache_gives_the_same_answers",
            "test_engine.py::test_sampling_with_a_seed_is_reproducible",
            "test_schema.py::test_batched_structured_answers_equal_one_by_one",
        ),
    ),
    M(
        "tiny-model-chatter-on-stdout",
        "`$(python3 -m granite_cli.tiny_model DIR)` is the folder's path",
        "granite_cli/tiny_model.py",
        "    print(built)\n",
        '    print("built", built)\n',
        ("test_process.py::test_tiny_model_builder_is_a_command",),
    ),
    M(
        "no-draft-decoding",
        "huge JPEGs are shrunk while decoding, never decoded whole",
        "granite_cli/pictures.py",
        '            image.draft("RGB", target)',
        "            pass",
        ("test_reliability.py::test_legitimately_large_image_is_shrunk_while_decoding",),
    ),
    M(
        "finish-reason-always-stop",
        "finish_reason says length when --max-new-tokens cut the answer",
        "granite_cli/engine/generation.py",
        '"length" if end is None else "stop"',
        '"stop"',
        ("test_ask.py::test_max_new_tokens_is_respected",),
    ),
    M(
        "ask-json-prints-nothing",
        "ask --json prints the record",
        "granite_cli/cli.py",
        '    _print_stdout(record.to_json() if json_output else "" if record.ok else None)',
        '    _print_stdout("")',
        (
            "test_engine.py::test_granite4_vision_pdf_and_ask",
            "test_reliability.py::test_encrypted_pdf_needs_its_password",
        ),
    ),
    # ------------------------------------------------------------ README: commands and inputs
    M(
        "ask-does-not-stream",
        "ask streams the answer to stdout",
        "granite_cli/cli.py",
        "stream=None if json_output else stdout",
        "stream=None",
        ("test_ask.py::test_streamed_answer_equals_the_json_answer",),
    ),
    M(
        "hidden-files-walked",
        "folder walks skip hidden files and folders",
        "granite_cli/sources.py",
        '            if entry.name.startswith(".") or _ours(entry):',
        "            if _ours(entry):",
        ("test_caption.py::test_directory_is_walked_in_order_with_every_page",),
    ),
    M(
        "globs-not-recursive",
        "quoted globs are expanded, ** included",
        "granite_cli/sources.py",
        "glob.glob(name, recursive=True)",
        "glob.glob(name, recursive=False)",
        ("test_caption.py::test_quoted_globs_are_expanded_including_double_star",),
    ),
    M(
        "stdin-nul-ignored",
        "paths on stdin may be NUL-separated (find -print0)",
        "granite_cli/inputs.py",
        'parts = text.split("\\0") if "\\0" in text else',
        "parts = [text] if False else",
        ("test_caption.py::test_stdin_path_list",),
    ),
    M(
        "duplicates-by-path",
        "one file is one record however it is named",
        "granite_cli/sources.py",
        "        if file_id in result.files:",
        "        if False:",
        ("test_safety.py::test_one_file_one_record_however_it_is_named",),
    ),
    M(
        "pdf-rendered-at-dpi",
        "PDF pages are rendered at the size the model uses",
        "granite_cli/readers.py",
        "    if fit is not None:\n        target = fit(*nominal)",
        "    if False:\n        target = fit(*nominal)",
        ("test_caption.py::test_pdf_pages_render_at_the_size_the_model_uses",),
    ),
    M(
        "exif-ignored",
        "EXIF orientation is applied",
        "granite_cli/pictures.py",
        "    image = ImageOps.exif_transpose(image) or image\n",
        "",
        ("test_inputs.py::test_exif_orientation_is_applied",),
    ),
    M(
        "bomb-not-refused",
        "decompression bombs are refused from the header",
        "granite_cli/pictures.py",
        "    if width * height > max_pixels:\n        image.close()",
        "    if False:\n        image.close()",
        ("test_reliability.py::test_decompression_bomb_is_refused_from_its_header",),
    ),
    M(
        "password-env-dropped",
        "$GRANITE_VISION_PDF_PASSWORD opens encrypted PDFs",
        "granite_cli/options.py",
        '        envvar="GRANITE_VISION_PDF_PASSWORD",\n',
        "",
        ("test_promises.py::test_pdf_password_from_the_environment",),
    ),
    M(
        "urls-are-paths-in-caption",
        "caption reads http(s) URLs",
        "granite_cli/sources.py",
        "    if name.startswith(URL_PREFIXES):\n        try:",
        "    if False:\n        try:",
        ("test_promises.py::test_caption_of_urls",),
    ),
    M(
        "error-line-without-page",
        "error lines say `error: FILE (page N): ...`",
        "granite_cli/ui.py",
        'f"{record.source} (page {record.page})"',
        "record.source",
        ("test_promises.py::test_the_error_line_names_the_file_and_page",),
    ),
    M(
        "progress-on-pipes",
        "progress bars and colours only on a terminal",
        "granite_cli/ui.py",
        "console = Console(stderr=True,",
        "console = Console(stderr=True, force_terminal=True,",
        ("test_process.py::test_find_pipe_caption_pipe_jq",),
    ),
    M(
        "no-progress-on-terminals",
        "a progress bar on a terminal",
        "granite_cli/ui.py",
        "        if not console.is_terminal or self.rank != 0:",
        "        if True:",
        ("test_promises.py::test_progress_bar_and_colours_on_a_terminal_only",),
    ),
    # ------------------------------------------------------------ README: how it works, performance
    M(
        "right-padding",
        "batches are left-padded: answers do not depend on the batch",
        "granite_cli/engine/batches.py",
        "input_ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)",
        "input_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)",
        (
            "test_engine.py::test_batched_answers_equal_the_model_card_loop",
            "test_promises.py::test_batched_answers_equal_the_model_card_loop_token_for_token",
        ),
    ),
    M(
        "no-grouping",
        "a batch holds pictures of similar image-token counts",
        "granite_cli/batching.py",
        "    for entry in sorted(entries, key=tokens):",
        "    for entry in entries:",
        ("test_promises.py::test_a_batch_holds_pictures_of_similar_token_counts",),
    ),
    M(
        "no-overlap",
        "pictures are loaded and prepared while the model runs",
        "granite_cli/pipeline.py",
        "    for batch in producer:\n",
        "    for batch in list(producer):\n",
        ("test_promises.py::test_pictures_are_prepared_while_the_model_runs",),
    ),
    M(
        "output-out-of-order",
        "records come out in input order",
        "granite_cli/pipeline.py",
        "        while self.next_index in self.pending:",
        "        while self.pending:",
        ("test_caption.py::test_output_order_is_input_order_whatever_the_batching",),
    ),
    M(
        "max-tiles-off-by-one",
        "--max-tiles N keeps grids of at most N tiles, the overview included",
        "granite_cli/engine/hf.py",
        "(p[0] // tile) * (p[1] // tile) + 1 <= max_tiles]",
        "(p[0] // tile) * (p[1] // tile) <= max_tiles]",
        ("test_engine.py::test_max_tiles_limits_the_grid_in_processor_and_model",),
    ),
    M(
        "max-tiles-model-only",
        "the --max-tiles token table (the processor's grid is limited too)",
        "granite_cli/engine/hf.py",
        "    processor.image_processor.image_grid_pinpoints = kept\n",
        "",
        ("test_promises.py::test_the_max_tiles_table_in_the_readme",),
    ),
    M(
        "max-new-tokens-not-passed",
        "answers are 256 tokens at most by default, not transformers' 20",
        "granite_cli/engine/generation.py",
        '            "max_new_tokens": settings.max_new_tokens,\n',
        "",
        ("test_promises.py::test_answers_are_256_tokens_at_most_by_default",),
    ),
    M(
        "cache-ignored-offline",
        "without a network, a cached model loads from the cache at once",
        "granite_cli/engine/hub.py",
        "        if cached:\n            return True",
        "        if False:\n            return True",
        ("test_promises.py::test_a_cached_model_loads_at_once_without_a_network",),
    ),
    M(
        "pinpoints-unchecked",
        "a processor/model pinpoint mismatch is one line at load",
        "granite_cli/engine/hf.py",
        "    _check_pinpoints(model, processor, network)\n",
        "",
        ("test_engine.py::test_pinpoint_mismatch_is_a_clear_error",),
    ),
    M(
        "no-grammar",
        "--schema constrains decoding: every answer validates",
        "granite_cli/engine/generation.py",
        "        if settings.schema is not None:\n            mask = grammar.GrammarMask(",
        "        if False:\n            mask = grammar.GrammarMask(",
        ("test_schema.py::test_every_answer_parses_and_validates",),
    ),
    M(
        "grammar-reads-input-ids",
        "grammar masks are filled while the forward pass runs (no `.tolist()` on the device's tokens)",
        "granite_cli/engine/generation.py",
        '            kwargs.setdefault("stopping_criteria", []).append(mask.sampled)\n',
        "",
        ("test_schema.py::test_the_grammar_never_reads_the_tokens_on_the_device_at_the_mask_step",),
    ),
    M(
        "stream-decodes-everything",
        "streaming decodes only the new tokens",
        "granite_cli/engine/generation.py",
        "            self.prefix, self.read = self.read, len(self.tokens)\n",
        "            self.prefix, self.read = 0, len(self.tokens)\n",
        ("test_engine.py::test_streaming_decodes_only_the_new_tokens",),
    ),
    M(
        "split-by-count",
        "several processes share items by cost, not count",
        "granite_cli/distributed.py",
        "heapq.heappush(loads, (load + costs[index], rank))",
        "heapq.heappush(loads, (load + 1, rank))",
        ("test_distributed.py::test_split_is_deterministic_complete_and_balanced_by_cost",),
    ),
    # ------------------------------------------------------------ keeping a GPU full (CPU proofs)
    M(
        "retry-keeps-the-failure",
        "a retry starts only after every reference to the failed attempt is gone",
        "granite_cli/engine/devices.py",
        "    gc.collect()\n    if torch.cuda.is_available():",
        "    if torch.cuda.is_available():",
        ("test_batching.py::test_a_retry_starts_only_after_the_failed_attempt_is_gone",),
    ),
    M(
        "any-error-splits",
        "only out-of-memory splits a batch; an item error is found running each item alone, once",
        "granite_cli/batching.py",
        '        elif outcome.kind == "oom":',
        "        elif True:",
        ("test_batching.py::test_an_item_error_is_found_running_each_item_alone_once",),
    ),
    M(
        "broken-device-goes-on",
        "a broken device stops the run (one line, exit 2, records kept)",
        "granite_cli/batching.py",
        '        if outcome.kind == "device":',
        "        if False:",
        ("test_batching.py::test_a_broken_device_stops_the_run_and_resume_finishes_it",),
    ),
    M(
        "fitted-forgotten",
        "what fitted after an out-of-memory error is remembered",
        "granite_cli/batching.py",
        "                sizer.remember(len(batch.entries), longest)\n",
        "                pass\n",
        ("test_batching.py::test_only_out_of_memory_splits_and_what_fitted_is_remembered",),
    ),
    M(
        "budget-ignored",
        "batches follow the token budget (photos in more rows than pages)",
        "granite_cli/engine/__init__.py",
        "            and (self.tokens is None or rows * (longest_prompt + max_new_tokens) <= self.tokens)\n",
        "            and (self.tokens is None or rows * longest_prompt <= self.tokens)\n",
        ("test_batching.py::test_batches_follow_the_token_budget",),
    ),
    M(
        "vision-outputs-kept",
        "no vision hidden state is alive during decode",
        "granite_cli/engine/generation.py",
        '            for name in ("pooler_output", "deepstack_features"):  # per picture: lists that join',
        '            for name in ("pooler_output", "deepstack_features", "hidden_states"):',
        ("test_batching.py::test_no_vision_hidden_state_is_alive_during_a_decode_step",),
    ),
    M(
        "features-kept",
        "the projected features are freed once the prefill has read them",
        "granite_cli/engine/generation.py",
        "            tensor.untyped_storage().resize_(0)\n",
        "            pass\n",
        ("test_batching.py::test_no_vision_hidden_state_is_alive_during_a_decode_step",),
    ),
    M(
        "prefill-not-chunked",
        "the prefill runs in chunks where the model allows it",
        "granite_cli/engine/generation.py",
        '                kwargs["prefill_chunk_size"] = self.prefill_chunk',
        "                pass",
        ("test_batching.py::test_the_prefill_is_chunked_where_the_model_allows_it",),
    ),
    M(
        "prefill-padded",
        "Granite Vision 3.x reads each prompt alone, without padding or an attention mask",
        "granite_cli/engine/generation.py",
        'self.by_rows = options.prefill == "rows" and model.config.model_type in ROW_PREFILL',
        "self.by_rows = False",
        ("test_engine.py::test_prompts_are_read_row_by_row_without_a_mask_and_answer_as_a_batch_does",),
    ),
    M(
        "static-cache-ratchet",
        "a static cache is sized to its batch: nothing grows over a run",
        "granite_cli/engine/generation.py",
        "return StaticCache(config=self.model.config, max_cache_len=shape[1] + settings.max_new_tokens)",
        "self.most = max(shape[1] + settings.max_new_tokens, getattr(self, 'most', 0))\n"
        "            return StaticCache(config=self.model.config, max_cache_len=self.most)",
        ("test_engine.py::test_static_cache_gives_the_same_answers",),
    ),
    M(
        "reports-on-the-model-thread",
        "the model never waits for report rebuilds",
        "granite_cli/output.py",
        "                self.rebuilder.add(record)",
        "                self._rebuild(self.records)",
        ("test_promises.py::test_reports_are_rebuilt_off_the_thread_that_runs_the_model",),
    ),
    # ------------------------------------------------------------ README: where captions go, the command line
    M(
        "sidecars-always-rewritten",
        "a picture whose sidecar exists is skipped, so a rerun finishes a stopped run",
        "granite_cli/sidecars.py",
        "        if self.overwrite:\n            return list(items)",
        "        if True:\n            return list(items)",
        ("test_formats.py::test_sidecars_sit_beside_each_picture_and_a_rerun_skips_them",),
    ),
    M(
        "sidecar-over-an-input",
        "a sidecar that is an input or a foreign file is never written",
        "granite_cli/sidecars.py",
        "    if (info.st_dev, info.st_ino) in inputs:",
        "    if False:",
        ("test_formats.py::test_sidecars_never_write_over_an_input_or_a_foreign_file",),
    ),
    M(
        "imagefolder-outside-dir",
        "imagefolder items outside the dataset folder are refused before the model loads",
        "granite_cli/writers.py",
        "            if where is None or base not in where.parents:",
        "            if where is None:",
        ("test_formats.py::test_imagefolder_refuses_what_its_loader_could_not_read",),
    ),
    M(
        "csv-unquoted",
        "CSV fields with commas, quotes or newlines are quoted",
        "granite_cli/writers.py",
        "        self.csv = csv.writer(stream)",
        '        self.csv = csv.writer(stream, quoting=csv.QUOTE_NONE, escapechar="\\\\")',
        ("test_formats.py::test_plain_csv_opens_in_a_spreadsheet",),
    ),
    M(
        "html-unescaped-names",
        "every name in the HTML report is escaped",
        "granite_cli/htmlreport.py",
        '<div class="body"><p class="name">{escape(name)}</p>',
        '<div class="body"><p class="name">{name}</p>',
        ("test_formats.py::test_the_html_report_has_a_card_per_item_and_escapes_everything",),
    ),
    M(
        "html-filter-inert",
        "the HTML report's filter hides what does not match",
        "granite_cli/htmlreport.py",
        "    card.classList.toggle('hidden', !hit);",
        "    card.classList.toggle('hidden', false);",
        ("test_formats.py::test_the_html_report_in_a_real_browser",),
    ),
    M(
        "markdown-embeds-failures",
        "the markdown report does not embed a picture that failed",
        "granite_cli/writers.py",
        "            if record.page is None and link and record.ok:",
        "            if record.page is None and link:",
        ("test_formats.py::test_markdown_links_every_tiff_page_and_embeds_no_failed_picture",),
    ),
    M(
        "choices-case-sensitive",
        "choices take any case",
        "granite_cli/options.py",
        '        "-f",\n        case_sensitive=False,',
        '        "-f",\n        case_sensitive=True,',
        ("test_help.py::test_choices_take_any_case",),
    ),
    M(
        "help-split-at-hyphens",
        "help is never cut: names and ids wrap whole",
        "granite_cli/helptext.py",
        "break_on_hyphens=False",
        "break_on_hyphens=True",
        ("test_help.py::test_help_piped_is_whole_with_flags_choices_defaults_and_variables",),
    ),
    M(
        "usage-errors-boxed",
        "every usage error is one line",
        "granite_cli/helptext.py",
        "        if not standalone_mode:\n            return super().main(",
        "        if True:\n            return super().main(",
        ("test_help.py::test_every_usage_error_is_one_line_and_exit_2",),
    ),
    M(
        "schema-names-ascii-only",
        "compact --schema field names in any script",
        "granite_cli/schema.py",
        "(?P<name>[^\\W\\d][\\w\\- ]*?)",
        "(?P<name>[A-Za-z_][\\w\\- ]*?)",
        ("test_schema.py::test_compact_field_names_in_any_script",),
    ),
    M(
        "skipped-counts-links",
        "the skipped count counts files, not the links to them",
        "granite_cli/sources.py",
        "            result.unsupported.setdefault((info.st_dev, info.st_ino), name)",
        "            result.unsupported.setdefault((info.st_dev, info.st_ino, name), name)",
        ("test_caption.py::test_the_skipped_count_counts_files_not_links",),
    ),
    # ------------------------------------------------------------ README: long runs and reports
    M(
        "report-rebuilt-every-record",
        "a report is rebuilt every few seconds, at most a tenth of the run",
        "granite_cli/journal.py",
        "max(REPORT_INTERVAL_S, 10 * took)",
        "0",
        ("test_promises.py::test_a_report_is_rebuilt_every_few_seconds_and_never_more_than_a_tenth_of_the_time",),
    ),
    M(
        "report-written-in-place",
        "a report is whole whenever it is read (atomic replacement)",
        "granite_cli/journal.py",
        "        os.replace(temp, path)\n    except BaseException:\n        Path(temp).unlink(missing_ok=True)\n        raise",
        "        os.replace(temp, path)\n    except BaseException:\n        os.replace(temp, path)\n        raise",
        ("test_promises.py::test_a_report_is_whole_whenever_it_is_read",),
    ),
    M(
        "second-ctrl-c-ignored",
        "a second Ctrl-C stops at once",
        "granite_cli/cli.py",
        "        if not stop.running or stop.event.is_set():\n            interrupt()\n",
        "        if not stop.running:\n            interrupt()\n        if stop.event.is_set():\n            return\n",
        ("test_promises.py::test_ctrl_c_finishes_the_batch_and_a_second_one_stops_at_once",),
    ),
    M(
        "ctrl-c-stops-at-once",
        "one Ctrl-C lets the current batch finish",
        "granite_cli/cli.py",
        "        if not stop.running or stop.event.is_set():\n            interrupt()\n        stop.event.set()",
        "        interrupt()\n        stop.event.set()",
        ("test_promises.py::test_one_ctrl_c_lets_the_current_batch_finish",),
    ),
    # ------------------------------------------------------------ README: your files are safe
    M(
        "input-overwritten",
        "an output that is one of the inputs is refused",
        "granite_cli/output.py",
        "        check_not_inputs(self._files(), items, self.label)\n",
        "",
        ("test_safety.py::test_an_output_that_is_an_input_is_refused_by_identity",),
    ),
    M(
        "foreign-overwritten",
        "a file that is not a granite-vision output is never written over",
        "granite_cli/ownership.py",
        '        if kind in (expected, "empty"):\n            continue',
        "        if True:\n            continue",
        (
            "test_safety.py::test_foreign_files_are_never_written_over",
            "test_safety.py::test_the_forgotten_output_name_glob",
        ),
    ),
    M(
        "eager-truncate",
        "an existing output changes only when there is a new record",
        "granite_cli/output.py",
        '    def check(self, items: Sequence[Item]) -> None:\n        """Refuse,',
        '    def check(self, items: Sequence[Item]) -> None:\n        self.path.write_text(\'\')\n        """Refuse,',
        ("test_safety.py::test_a_failed_model_load_leaves_report_and_journal_byte_for_byte",),
    ),
    M(
        "signal-waits-for-loading",
        "a signal while the model loads ends the run at once",
        "granite_cli/cli.py",
        "        if not stop.running or stop.event.is_set():\n            interrupt()\n        stop.event.set()",
        "        if stop.event.is_set():\n            interrupt()\n        stop.event.set()",
        ("test_safety.py::test_a_signal_while_the_model_loads_ends_the_run_at_once_and_touches_nothing",),
    ),
    M(
        "resume-any-job",
        "--resume continues the same job only",
        "granite_cli/output.py",
        "            if (why := job.difference(record)) is not None:",
        "            if None:",
        ("test_safety.py::test_resume_refuses_another_format_prompt_model_or_schema",),
    ),
    M(
        "special-files-opened",
        "pipes, sockets and devices in walks and globs are never opened",
        "granite_cli/sources.py",
        "    elif isinstance(info, os.stat_result) and not stat.S_ISREG(info.st_mode):\n        result.special += 1",
        "    elif False:\n        result.special += 1",
        ("test_safety.py::test_pipes_sockets_and_devices_in_folders_and_globs_are_never_opened",),
    ),
    M(
        "output-error-traceback",
        "a failed output is one line, not a traceback",
        "granite_cli/journal.py",
        "    except OSError as exc:\n        raise OutputError(where, exc, resumable) from None",
        "    except ZeroDivisionError as exc:\n        raise OutputError(where, exc, resumable) from None",
        ("test_safety.py::test_a_full_disk_is_one_line_exit_2",),
    ),
    M(
        "closed-pipe-is-an-error",
        "a reader that goes away is exit 141, silently",
        "granite_cli/cli.py",
        "            if exc.broken_pipe:\n                raise typer.Exit(141) from None\n",
        "",
        ("test_safety.py::test_a_closed_pipe_is_exit_141_and_silent",),
    ),
    M(
        "no-folder-probe",
        "an output that cannot be written is reported before the model loads",
        "granite_cli/output.py",
        "    if ranks.rank == 0:\n        probe_folder(path, label)\n",
        "",
        ("test_safety.py::test_an_output_folder_that_cannot_hold_the_file_is_refused_before_the_model_loads",),
    ),
    M(
        "prompt-markup-read",
        "prompts are text: control-token text is spelled out",
        "granite_cli/engine/prompts.py",
        "        if not any(special in question for special in self.special_texts):",
        "        if True:",
        ("test_safety.py::test_special_token_text_in_a_prompt_reaches_the_model_as_text",),
    ),
    M(
        "context-unchecked",
        "prompts beyond the context window are refused before generating",
        "granite_cli/engine/prompts.py",
        "        if tokens + max_new_tokens <= self.context_window:",
        "        if True:",
        ("test_safety.py::test_prompts_beyond_the_context_window",),
    ),
    M(
        "text-only-loads",
        "a text-only model is named as such",
        "granite_cli/engine/hf.py",
        "    _check_vision_model(model, revision, local_only)\n",
        "",
        ("test_safety.py::test_a_text_only_model_is_named_as_such",),
    ),
]


def copy_tree(destination: Path) -> None:
    """The working tree as git sees it (tracked and new files, not ignored ones)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def check(mutation: Mutation, tree: Path) -> tuple[str, list[str], float]:
    """'caught' when every one of its tests fails, else 'SURVIVED' with the tests that passed;
    'STALE' when the code to change is not there exactly once."""
    path = tree / mutation.file
    original = path.read_text()
    if original.count(mutation.old) != 1:
        return "STALE", [], 0.0
    path.write_text(original.replace(mutation.old, mutation.new))
    try:
        started = time.monotonic()
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
        tests = [f"tests/{test}" for test in mutation.tests]
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *tests],
            cwd=tree, env=env, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        failed = {
            line.split()[1].split("[")[0].removeprefix("tests/")
            for line in result.stdout.splitlines()
            if line.startswith(("FAILED ", "ERROR "))
        }
        survivors = [test for test in mutation.tests if test not in failed]
        return ("caught" if not survivors else "SURVIVED"), survivors, time.monotonic() - started
    finally:
        path.write_text(original)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for mutation in chosen:
            print(f"{mutation.name}: {mutation.breaks}\n    {mutation.file}\n    " + "\n    ".join(mutation.tests))
        return 0
    caught = 0
    with tempfile.TemporaryDirectory(prefix="granite-mutations-") as temp:
        tree = Path(temp)
        copy_tree(tree)
        for mutation in chosen:
            verdict, survivors, seconds = check(mutation, tree)
            caught += verdict == "caught"
            print(f"{verdict:8} {mutation.name:30} {seconds:6.1f} s  {', '.join(mutation.tests)}", flush=True)
            for test in survivors:
                print(f"         still passes: {test}", flush=True)
    print(f"caught {caught} / {len(chosen)}")
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
