"""The user's exceptions as the kernel says them: one line naming what raised and where in their code, and the
traceback trimmed to their frames (the kernel's and libraries' left out; a DataLoader worker's read from its text)."""

from __future__ import annotations

import os
import re
import sysconfig
import traceback

from trainbus.proto import __file__ as trainbus_proto_file
from trainbus.proto.text import ERROR_CHARS, exception_message, printable

from .spec import UserCodeError

# Where frames are not the user's: the standard library, installed packages, this kernel and the protocol it uses
# (outside site-packages in an editable install: ./scripts/setup's).
_NOT_USER_ROOTS = tuple({os.path.abspath(p) + os.sep for key in ("stdlib", "platstdlib", "purelib", "platlib")
                         if (p := sysconfig.get_paths().get(key))}
                        | {os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, trainbus_proto_file)})


def is_user_file(path: str) -> bool:
    """Whether a frame's file is the user's code: not the standard library, an installed package or trainbus, nor a
    compiled extension's Cython source, which its frames name relative (`pandas/_libs/parsers.pyx`): not a file in
    the working directory."""
    if not os.path.isabs(path) and path.endswith((".pyx", ".pxd", ".pxi")):
        return False
    return not os.path.abspath(path).startswith(_NOT_USER_ROOTS)


def user_code_error(exc: BaseException, what: str) -> UserCodeError:
    """The user's exception as one line, and its traceback trimmed to their frames (their files)."""
    where, trace = user_trace(exc)
    if isinstance(exc, SystemExit):
        return UserCodeError(f"{what}: {_exited(exc)}{where}", trace)
    text = printable((exception_message(exc).strip().splitlines() or [""])[0], ERROR_CHARS)
    return UserCodeError(f"{what} raised {type(exc).__name__}{': ' + text if text else ''}{where}", trace)


def _exited(exc: SystemExit) -> str:
    """A sys.exit() in the user's code, said with its fix: it would end the kernel, and the run, with no word."""
    by_argparse = any(os.path.basename(frame.filename) == "argparse.py"
                      for frame in traceback.extract_tb(exc.__traceback__))
    fix = ("argparse read trainbus's own command line: parse arguments under `if __name__ == \"__main__\":` and take "
           "them as the function's parameters (flags: NAME=VALUE)" if by_argparse
           else "a training function returns, or raises an exception, to end")
    return f"sys.exit({printable(repr(exc.code), ERROR_CHARS)}) would end the process; {fix}"


TRACE_MESSAGE_CHARS = 5000  # the exception's message under the user's frames on the terminal (kernel.log has it all)

# torch re-raises an exception from a DataLoader worker process with the worker's traceback as text in its message
_WORKER = re.compile(r"\A(Caught \w+ in (DataLoader worker process \d+))\.\nOriginal Traceback \(most recent call "
                     r"last\):\n(?P<trace>.*)\Z", re.S)
_TRACE_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>.+)\n'
                          r'(?:    (?P<code>.*)\n)?', re.M)


def error_line(exc: BaseException) -> str:
    """The exception as the one-line error: `Type: message`. One from a DataLoader worker is the worker's own
    last line, and where it ran (torch's message holds the worker's whole traceback)."""
    if isinstance(exc, SystemExit):
        return f"SystemExit: {_exited(exc)}"
    message = exception_message(exc)
    worker = _WORKER.match(message)
    if worker:
        last = [line for line in worker["trace"].strip().splitlines() if line.strip()][-1]
        return f"{printable(last.strip(), ERROR_CHARS)} (in {worker[2]})"
    lines = [line for line in message.splitlines() if line.strip()]
    text = type(exc).__name__ + (f": {printable(lines[0].strip(), ERROR_CHARS)}" if lines else "") + (
        " (the whole message is in the run's kernel.log)" if len(lines) > 1 else "")
    if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
        text += "; torch.compile failed: fix what it names, or train without --compile"
    return text


# how Python's own traceback joins an exception to the one it was raised from
_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def user_trace(exc: BaseException) -> tuple[str, str]:
    """Where in the user's code `exc` was raised (" (in your code: FILE, line N)", or "" when none of their code
    ran) and its traceback trimmed to their frames: "" without any (a lone exception line would only repeat
    the one-line error), except for a SyntaxError, whose file, line and caret are the point. An exception from a
    DataLoader worker is read from the worker's traceback, which torch passes on as text.

    The exceptions it was raised from lead it, as Python chains them: `raise ... from e`'s cause always (trimmed
    too; its line alone where none of its frames are theirs), one it was raised while handling where their code
    handled it (a library's own handling is not theirs to read)."""
    where, trace = _trimmed(exc)
    seen = {id(exc)}
    while trace:
        if exc.__cause__ is not None:
            cause, link = exc.__cause__, _CAUSE
        elif exc.__context__ is not None and not exc.__suppress_context__:
            cause, link = exc.__context__, _CONTEXT
        else:
            break
        if id(cause) in seen:
            break
        seen.add(id(cause))
        said = _trimmed(cause)[1]
        if not said and link is _CONTEXT:
            break
        trace = (said or _exception_only(cause)) + link + trace
        exc = cause
    return where, trace


def _exception_only(exc: BaseException) -> str:
    text = printable("".join(traceback.format_exception_only(type(exc), exc)), TRACE_MESSAGE_CHARS, lines=True)
    return text.rstrip("\n") + "\n"


def _trimmed(exc: BaseException) -> tuple[str, str]:
    """user_trace for exc alone, not the exceptions it was raised from."""
    worker = _WORKER.match(exception_message(exc))
    if worker:
        frames = [traceback.FrameSummary(m["file"], int(m["line"]), m["name"], line=m["code"] or "")
                  for m in _TRACE_FRAME.finditer(worker["trace"])]
        last = error_line(exc).rsplit(" (in ", 1)[0] + "\n"
    else:
        frames, last = traceback.extract_tb(exc.__traceback__), None
    frames = [f for f in frames
              if not f.filename.startswith("<") and is_user_file(f.filename)]
    if not frames and not isinstance(exc, SyntaxError):
        return "", ""
    header = ["Traceback (most recent call last; your code only):\n"] if frames else []
    last = last or _exception_only(exc)
    trace = "".join([*header, *traceback.format_list(frames), last.rstrip("\n") + "\n"])
    return (f" (in your code: {frames[-1].filename}, line {frames[-1].lineno})" if frames else ""), trace
