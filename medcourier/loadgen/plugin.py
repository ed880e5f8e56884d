"""``medcourier bench``: the load generator's command line (``loadgen`` in the entry points).

medcourier bench mllp --port 2575 --count 1000 --connections 8
medcourier bench mllp --port 2575 --message oru --payload-size 1048576 --duration 30 --rate 20
medcourier bench http --url http://127.0.0.1:8080 --count 500 --connections 16 --wait-completed
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from medcourier.engine.plugins import CliCommand, hookimpl
from medcourier.loadgen.http_load import HttpTarget, run_http
from medcourier.loadgen.messages import MessageSource
from medcourier.loadgen.mllp_load import MllpTarget, run_mllp
from medcourier.loadgen.progress import Progress
from medcourier.loadgen.report import Report
from medcourier.loadgen.runner import Schedule, SetupError

EXIT_ERRORS = 1
EXIT_SETUP = 2
DEFAULT_SIZES = {"adt": 2048, "oru": 4096}

DESCRIPTION = """\
Send load to an MLLP listener or to the $send-to-ehr API and report messages per second, latency
percentiles (p50, p90, p99, max) and errors by kind, as a table on stdout or as JSON.

Pacing. Without --rate the load is a closed loop: each connection sends a message as soon as the
previous one is answered. With --rate R it is an open loop: message i is due at start + i/R,
shared among the connections, and its latency is measured from that due time. When the target
falls behind, the time a message waited for a free connection counts in its latency, so a stall
is not hidden by sending less ("coordinated omission"). Give enough --connections for the rate.

Figures. messages/s counts the successful messages (ok / seconds), from the first send to the
last answer. Latency percentiles are nearest-rank, over the successful messages. Errors are
counted by kind and never stop the run.

Exit status: 0 once the report is printed, even if some messages failed (use --fail-on-error to
get 1 then); 2 when the load cannot start (target unreachable, patient not created, bad option).
Ctrl-C stops sending, waits for the messages in flight and prints the report of what was sent.
"""

MLLP_HELP = """\
Each connection sends framed HL7 v2 messages and waits for each ACK. Every message has its own
MSH-10 and, unless --patients is given, its own fictitious patient and visit (MSH-4 is
--facility). A message succeeds when its ACK is AA (or CA) for its MSH-10; errors: AE, AR, CE, CR
(refused), bad-ack (not an ACK, or for another message), timeout, closed (connection closed or
reset before the ACK), connect (could not reconnect). After a timeout or a broken connection, the
connection is opened again.
"""

HTTP_HELP = """\
Posts CommunicationRequest/$send-to-ehr documents: a PDF of --payload-size bytes for one patient
(created first with POST /fhir/Patient unless --patient-id is given; the token needs SEND_TO_EHR
and PATIENT_CREATE). A 200 with a transaction id succeeds; errors: http-<status>, timeout,
connection, bad-answer. With --wait-completed, $tracking is then polled until every accepted
document is completed or entered-in-error; that end-to-end phase is reported apart (latency from
the submit to the engine's "sent" time, which assumes both clocks agree).
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    amount = parser.add_mutually_exclusive_group(required=True)
    amount.add_argument("--count", "-n", type=_positive_int, metavar="N", help="send N messages")
    amount.add_argument(
        "--duration", "-d", type=_positive_float, metavar="S", help="send for S seconds"
    )
    parser.add_argument(
        "--connections", "-c", type=_positive_int, default=1, metavar="C", help="connections (1)"
    )
    parser.add_argument(
        "--rate",
        "-r",
        type=_positive_float,
        metavar="R",
        help="open loop at R messages/s in all (latency from the due time); default: closed loop",
    )
    parser.add_argument(
        "--json",
        metavar="FILE",
        help="write the report as JSON to FILE; '-' prints JSON on stdout instead of the table",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument(
        "--fail-on-error",
        action="store_true",
        help=f"exit with {EXIT_ERRORS} when any message failed (default: 0)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medcourier bench``."""
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    modes = parser.add_subparsers(dest="bench_mode", required=True, metavar="{mllp,http}")

    mllp = modes.add_parser(
        "mllp",
        help="HL7 v2 over MLLP: ADT^A01 or ORU^R01, each awaiting its ACK",
        description=MLLP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mllp.add_argument("--host", default="127.0.0.1", help="listener address (127.0.0.1)")
    mllp.add_argument("--port", "-p", type=int, default=2575, help="listener port (2575)")
    mllp.add_argument(
        "--message",
        "-m",
        choices=["adt", "oru"],
        default="adt",
        help="adt: ADT^A01 admissions; oru: ORU^R01 with a PDF in an OBX of type ED (adt)",
    )
    mllp.add_argument(
        "--payload-size",
        "-s",
        type=_positive_int,
        metavar="BYTES",
        help=f"adt: size of the message ({DEFAULT_SIZES['adt']}; at least the base segments, "
        f"~700 bytes); oru: size of the PDF ({DEFAULT_SIZES['oru']})",
    )
    mllp.add_argument("--facility", default="LOADGEN", help="MSH-4, the sending hospital (LOADGEN)")
    mllp.add_argument(
        "--patients",
        type=_positive_int,
        metavar="N",
        help="cycle through N patients and visits (default: a new patient and visit per message)",
    )
    mllp.add_argument(
        "--timeout", type=_positive_float, default=10.0, metavar="S", help="ACK timeout (10)"
    )
    _common(mllp)

    http = modes.add_parser(
        "http",
        help="FHIR CommunicationRequest/$send-to-ehr, optionally waiting for delivery",
        description=HTTP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    http.add_argument(
        "--url", default="http://127.0.0.1:8080", help="engine base URL (http://127.0.0.1:8080)"
    )
    http.add_argument(
        "--token", help="API bearer token (default: the MEDCOURIER_API_TOKEN environment variable)"
    )
    http.add_argument(
        "--payload-size",
        "-s",
        type=_positive_int,
        default=4096,
        metavar="BYTES",
        help="size of the PDF (4096)",
    )
    http.add_argument("--patient-id", help="send for this Patient id instead of creating one")
    http.add_argument(
        "--organization",
        metavar="Organization/ID",
        help="managingOrganization of the patient created, for routes that match on it",
    )
    http.add_argument(
        "--wait-completed",
        action="store_true",
        help="then follow every accepted document on $tracking and report end-to-end figures",
    )
    http.add_argument(
        "--wait-timeout",
        type=_positive_float,
        default=300.0,
        metavar="S",
        help="give up waiting for delivery after S seconds (300)",
    )
    http.add_argument(
        "--timeout", type=_positive_float, default=30.0, metavar="S", help="request timeout (30)"
    )
    _common(http)


@contextlib.contextmanager
def _stop_on_interrupt(schedule: Schedule, stderr: TextIO) -> Iterator[None]:
    """The first Ctrl-C (or SIGTERM) stops sending and the report still comes out; after it the
    signals act as usual again, so a second Ctrl-C abandons the run."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []

    def restore() -> None:
        while installed:
            loop.remove_signal_handler(installed.pop())

    def stop() -> None:
        schedule.stop()
        restore()
        print(
            "\nmedcourier bench: stopping after the messages in flight (Ctrl-C again to abandon)",
            file=stderr,
            flush=True,
        )

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop)
            installed.append(sig)
    try:
        yield
    finally:
        restore()


async def bench(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    """Run ``medcourier bench`` with parsed options; print the report on ``stdout``."""
    schedule = Schedule(count=args.count, duration=args.duration, rate=args.rate)
    progress = Progress(stderr, enabled=not args.no_progress)
    report: Report
    try:
        with _stop_on_interrupt(schedule, stderr):
            if args.bench_mode == "mllp":
                size = args.payload_size or DEFAULT_SIZES[args.message]
                source = MessageSource(
                    args.message, size, facility=args.facility, patients=args.patients
                )
                report = await run_mllp(
                    MllpTarget(args.host, args.port, args.timeout),
                    source,
                    schedule,
                    args.connections,
                    progress,
                )
            else:
                token = args.token or os.environ.get("MEDCOURIER_API_TOKEN") or None
                target = HttpTarget(
                    args.url,
                    token=token,
                    timeout=args.timeout,
                    patient_id=args.patient_id,
                    organization=args.organization,
                )
                report = await run_http(
                    target,
                    schedule,
                    args.connections,
                    payload_size=args.payload_size,
                    wait=args.wait_completed,
                    wait_timeout=args.wait_timeout,
                    progress=progress,
                )
    except SetupError as exc:
        print(f"medcourier bench: {exc}", file=stderr)
        return EXIT_SETUP
    except ValueError as exc:
        print(f"medcourier bench: {exc}", file=stderr)
        return EXIT_SETUP
    data = json.dumps(report.to_json(), indent=2, ensure_ascii=False)
    if args.json == "-":
        print(data, file=stdout)
    else:
        print(report.table(), file=stdout)
    stdout.flush()
    if args.json and args.json != "-":
        try:
            Path(args.json).write_text(data + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"medcourier bench: cannot write {args.json}: {exc}", file=stderr)
            return EXIT_SETUP
    return EXIT_ERRORS if args.fail_on_error and report.errors else 0


async def run(args: argparse.Namespace) -> int:
    return await bench(args, sys.stdout, sys.stderr)


@hookimpl
def medcourier_cli_commands() -> list[CliCommand]:
    """``medcourier bench``: load an MLLP listener or the $send-to-ehr API and report."""
    return [
        CliCommand(
            name="bench",
            help="send load over MLLP or to $send-to-ehr and report messages/s and latency",
            add_arguments=add_arguments,
            run=run,
        )
    ]
