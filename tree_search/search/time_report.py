"""The report's section in time: training time predicted by a cost profile, decoding time measured (and predicted).

`compare_runs` (`tree_search.search.report`) adds it when the runs' costs, or ``--cost``,
name a profile: each finalist's time per token, per-cap verdicts in time, the comparison at
the adaptive softmax's time, and each finalist's exact top-k decoding timed on its trained
head beside the decoding model's prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tree_search.builders import huffman
from tree_search.cost import DECODE_SETTINGS, CostProfile, DecodeCost
from tree_search.data.features import default_device
from tree_search.heads.timing import time_decoding
from tree_search.reward.node_train import split_sample
from tree_search.reward.reward import trained_head
from tree_search.search.verdicts import FinalScores, comparison_of, interval_text, time_verdicts, verdict_words

__all__ = ["measure_decoding", "time_fields", "time_report_lines"]

DECODE_K, DECODE_BATCH = DECODE_SETTINGS["decode_k"], DECODE_SETTINGS["decode_batch"]  # as profiles measure it


def measure_decoding(
    rows: list[dict[str, Any]], entries: Sequence[tuple], dataset, recipe, log, decode_model: DecodeCost | None
) -> None:
    """Add each row's measured exact top-5 decoding time (µs per query at batch 256, ms at batch 1).

    Heads hold the search recipe's node weights (the node bank's: nothing is trained again
    for a tree the search evaluated); queries are the validation split's first 256 rows.
    Binary Huffman's head is the unit (``decode_vs_huffman``), timed here when no row has it.
    With a decoding model, each row also gets its prediction (``decode_predicted_us``), the
    number ``--cost decode`` searches with, to set beside the measurement.
    """
    device = default_device()
    queries = split_sample(dataset, "valid", 4 * DECODE_BATCH, 0, device).features.float()[:DECODE_BATCH]
    trees = {e[5]: (e[0], e[2], e[3]) for e in entries}
    unit_key = next((r["key"] for r in rows if r["name"] == "huffman-2"), None)
    jobs = [(r["key"], *trees[r["key"]]) for r in rows if r["key"] in trees]
    if unit_key is None:
        jobs.append((None, "huffman-2", huffman(dataset.class_weights, 2), {}))
    measured = {}
    for index, (key, name, tree, projections) in enumerate(jobs, start=1):
        if log:
            log(f"decoding time {index}/{len(jobs)}: {name} (exact top-{DECODE_K})")
        head = trained_head(tree, dataset, recipe, projections=projections or None, device=device).eval()
        measured[key] = time_decoding(head, queries, k=DECODE_K, batch=DECODE_BATCH, repeats=15)
        if decode_model is not None:
            measured[key]["predicted"] = decode_model.predict(tree, None, projections=projections or None)
    unit = measured[unit_key]["batch"]
    for r in rows:
        seconds = measured[r["key"] if r["key"] in measured else "full"]  # the converged reference: the same flat head
        r.update(decode_us_per_query=seconds["batch"] * 1e6, decode_latency_ms=seconds["single"] * 1e3,
                 decode_vs_huffman=seconds["batch"] / unit)  # fmt: skip
        if "predicted" in seconds:
            r["decode_predicted_us"] = seconds["predicted"] * 1e6


def time_fields(profile: CostProfile, tree, counts: np.ndarray, projections, unit: float) -> dict[str, float]:
    """A report row's predicted training time: microseconds per token and multiples of binary Huffman's."""
    seconds = profile.predict(tree, counts, projections=projections or None)
    return {"time_us_per_token": seconds * 1e6, "time_vs_huffman": seconds / unit}


def time_report_lines(
    rows: Sequence[dict[str, Any]], caps: Sequence[float], profile: CostProfile, num_classes: int, scores: FinalScores
) -> list[str]:
    """The report's section in time: per-cap verdicts and the comparison at the adaptive shapes' time.

    In training time (the profile's prediction) and, when the rows have it, in decoding time (measured).
    """
    held = profile.fit.get("held_out", {})
    error = held.get("median_abs_relative_error", math.nan)
    lines = [
        "",
        "## In time",
        "",
        f"Training time per token (forward + backward, batch {profile.batch}, {profile.precision}) predicted by "
        f"the cost profile of {profile.device} (held-out median error {error:.1%}); caps in multiples of "
        "binary Huffman's time.",
        "",
        "| tree | µs / token | time / Huffman | multiply-adds / Huffman | test NLL |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["time_vs_huffman"]):
        lines.append(f"| {r['name']} | {r['time_us_per_token']:.2f} | {r['time_vs_huffman']:.2f} | "
                     f"{r['macs_vs_huffman']:.2f} | {r['test_nll']:.4f} |")  # fmt: skip
    unit = next((r for r in rows if r["name"] == "huffman-2"), None)
    if unit is not None and caps:
        per_thousand = unit["time_us_per_token"] / unit["time_vs_huffman"]  # µs per token = ms per 1,000 tokens
        lines += ["", f"Binary Huffman trains in {per_thousand:.2f} ms per 1,000 tokens here, so the time caps are "
                  + ", ".join(f"{c:g}x = {c * per_thousand:.2f} ms" for c in caps) + " per 1,000 tokens."]  # fmt: skip
    lines += _axis_lines(time_verdicts(rows, caps, scores), "time_vs_huffman", "time cap", "time")
    for name, ref in profile.fit.get("references", {}).items():
        at = "" if profile.num_classes == num_classes else f" (calibrated at V = {profile.num_classes:,}, not this V)"
        ratio = ref["measured"] / ref["same_shape_measured"]
        lines.append(f"- PyTorch's `{name}` with the same cutoffs, timed beside our head when the profile was "
                     f"made{at}: {ref['measured'] * 1e6:.2f} µs/token, {ratio:.2f}x our head on the "
                     f"`{ref['same_shape']}` shape.")  # fmt: skip
    if rows and "decode_vs_huffman" in rows[0]:
        lines += [
            "",
            "### Decoding time",
            "",
            f"Exact top-{DECODE_K} (`TreeSoftmaxHead.predict`) measured on this machine for each tree's head with "
            f"the search recipe's weights, on {DECODE_BATCH} validation queries at once (µs per query) and one "
            "query at a time (ms); times in multiples of binary Huffman's at batch "
            f"{DECODE_BATCH}. A tree that trains fast may decode slowly: the two fronts differ.",
            "",
            "| tree | µs / query | predicted | ms / query, batch 1 | decoding / Huffman | training / Huffman "
            "| test NLL |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sorted(rows, key=lambda r: r["decode_vs_huffman"]):
            predicted = f"{r['decode_predicted_us']:.1f}" if "decode_predicted_us" in r else ""
            lines.append(f"| {r['name']} | {r['decode_us_per_query']:.1f} | {predicted} | "
                         f"{r['decode_latency_ms']:.2f} | {r['decode_vs_huffman']:.2f} | {r['time_vs_huffman']:.2f} | "
                         f"{r['test_nll']:.4f} |")  # fmt: skip
        errors = [abs(r["decode_predicted_us"] / r["decode_us_per_query"] - 1)
                  for r in rows if "decode_predicted_us" in r]  # fmt: skip
        if errors:
            lines += ["", f"\"predicted\": the decoding model (`--cost decode`: the profile's prices of the pairs the "
                      "certified beam search scores, replayed on a class-mean classifier's distributions of "
                      f"validation rows) errs by {float(np.median(errors)):.0%} in the median on these trained heads "
                      f"(largest {max(errors):.0%})."]  # fmt: skip
        found = time_verdicts(rows, caps, scores, field="decode_vs_huffman")
        lines += ["", "Each searched tree against the classic trees' decoding front (test NLL against decoding time, "
                  "interpolated in log time at the searched tree's time):", "",
                  "| searched tree | decoding / Huffman | test NLL | classic front there | difference | verdict |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for f in found["front"]:
            r = f["searched"]
            if f["front_nll"] is None:
                lines.append(f"| {r['name']} | {r['decode_vs_huffman']:.2f} | {r['test_nll']:.4f} | "
                             "faster than every classic tree | | no verdict |")  # fmt: skip
                continue
            words = verdict_words(comparison_of(f))
            lines.append(f"| {r['name']} | {r['decode_vs_huffman']:.2f} | {r['test_nll']:.4f} | {f['front_nll']:.4f} | "
                         f"{f['difference']:+.4f} {interval_text(f['interval'])} | {words} |")  # fmt: skip
        lines += _axis_lines({**found, "caps": []}, "decode_vs_huffman", "", "decoding time")
    return lines


def _axis_lines(found: dict[str, Any], field: str, cap_word: str, time_word: str) -> list[str]:
    """`time_verdicts` in words: a table of per-cap verdicts and one line per adaptive shape."""
    lines = []
    if found["caps"]:
        header = f"| {cap_word} | best classic tree | test NLL | best searched | test NLL | difference | verdict |"
        lines += ["", header, "|---|---|---|---|---|---|---|"]
        for c in found["caps"]:
            classic, pick = c["classic"], c["searched"]
            if classic is None or pick is None:
                lines.append(f"| {c['cap']:g}x | {classic['name'] if classic else 'none fits'} | | "
                             f"{pick['name'] if pick else 'none fits'} | | | no verdict |")  # fmt: skip
                continue
            lines.append(f"| {c['cap']:g}x | {classic['name']} | {classic['test_nll']:.4f} | {pick['name']} | "
                         f"{pick['test_nll']:.4f} | {c['difference']:+.4f} {interval_text(c['interval'])} | "
                         f"{verdict_words(comparison_of(c))} |")  # fmt: skip
    lines.append("")
    for a in found["adaptive"]:
        shape = a["shape"]
        line = (f"- At the {time_word} of `{shape['name']}` ({shape[field]:.2f}x Huffman, "
                f"test {shape['test_nll']:.4f}): ")  # fmt: skip
        if "searched" in a:
            pick, words = a["searched"], verdict_words(comparison_of(a))
            line += (f"the searched `{pick['name']}` ({pick[field]:.2f}x) scores {pick['test_nll']:.4f}, "
                     f"{a['difference']:+.4f} {interval_text(a['interval'])} ({words})")  # fmt: skip
        else:
            line += "no searched tree is that fast"
        if a["speedup"] is not None:
            pace = f"{a['speedup']:.2f}x faster" if a["speedup"] >= 1 else f"{1 / a['speedup']:.2f}x slower"
            line += f"; the fastest searched tree as good on test, `{a['matching']['name']}`, is {pace}."
        else:
            line += "; no searched tree is as good on test at any time."
        lines.append(line)
    return lines
