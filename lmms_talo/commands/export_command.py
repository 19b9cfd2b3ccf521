"""`lmms-talo export`: write a checkpoint with a TaLo knockout baked into its weights."""

from __future__ import annotations

import argparse

HELP = "write a Hugging Face checkpoint with the knockout baked in (for vLLM, SGLang, any serving stack)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained", required=True, help="model folder or hub id")
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--layer", type=int, help="decoder layer to knock out")
    choice.add_argument("--from-report", metavar="REPORT", help="talo_report.json of a run (with --task)")
    parser.add_argument("--task", help="task or sub-task whose selected layer to export (with --from-report)")
    parser.add_argument("--intervention", default="zero", help="zero (default), uniform or mean (with --layer)")
    parser.add_argument("--dtype", default="auto", help="dtype to load and save in (default: the checkpoint's)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--out", required=True, help="output folder")


def run(args: argparse.Namespace) -> int:
    from lmms_talo.outputs.export import ExportError, export, selection_from_report

    if args.from_report:
        if not args.task:
            raise SystemExit("lmms-talo export: --from-report needs --task <task or sub-task name>")
        try:
            layers, intervention = selection_from_report(args.from_report, args.task)
        except ExportError as exc:
            raise SystemExit(f"lmms-talo export: {exc}") from None
    else:
        layers, intervention = (args.layer,), args.intervention
    out = export(args.pretrained, layers, intervention, args.out, args.dtype, args.trust_remote_code)
    named = "layer" if len(layers) == 1 else "layers"
    print(f"wrote {out}: {named} {'+'.join(map(str, layers))} knocked out ({intervention}); config.talo records it")
    return 0
