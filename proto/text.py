"""Text from elsewhere (a user's exception, a plugin's log line) made safe to show and to store; a duration as people
read it.

An exception's message can hold anything: a file name that is not UTF-8 (a lone surrogate, which SQLite, a
UTF-8 log file and json with ensure_ascii=False all refuse), terminal escape sequences (one clears the screen),
or megabytes. Everything the kernel and the console take as "the error" goes through `printable` first.
"""

TRUNCATED = " [... truncated {} chars]"  # what ends a text cut to a limit (a log line, a metric name)
ERROR_CHARS = 500  # an error line in the console, summary.json and `runs list`; the whole text is in kernel.log

# C0 controls, DEL and C1 controls, shown as escapes (\x1b) instead of acting on the terminal; a tab is a space.
# U+2028 and U+2029 too: no control characters, but line breaks to Python's splitlines() and JavaScript's /^$/m, so a
# peer's log text holding one began a line of kernel.log that read as the kernel's own "sockets:" line (§2).
_ESCAPED = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))} | {ord("\t"): " "} | {
    code: f"\\u{code:04x}" for code in (0x2028, 0x2029)}
_ESCAPED_KEEPING_LINES = {code: text for code, text in _ESCAPED.items() if code != ord("\n")}


def printable(text: str, limit: int = 0, lines: bool = False) -> str:
    """`text` with control characters escaped (newlines too unless `lines`) and lone surrogates as \\udcXX,
    cut to `limit` characters (0: whole) with what was left out counted."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = text.translate(_ESCAPED_KEEPING_LINES if lines else _ESCAPED)
    if limit and len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit:,} more characters)"
    return text


def not_utf8(text: str) -> str:
    """"" for text that is UTF-8; else what is not, in words: "a byte of another encoding: 0xff" for the lone
    surrogate Python reads such a byte of a command line or file name as."""
    try:
        text.encode("utf-8")
        return ""
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        if "\udc80" <= bad <= "\udcff":
            return f"a byte of another encoding: {ord(bad) - 0xdc00:#04x}"
        return f"a lone surrogate: {ord(bad):#06x}"


def exception_message(exc: BaseException) -> str:
    """str(exc), or what Python's own traceback says when the exception's __str__ itself raises."""
    try:
        return str(exc)
    except Exception:
        return "<exception str() failed>"


def duration_text(seconds: float | None) -> str:
    """47 ms, 12.3 s, 4m 05s, 2h 07m; "-" for None. (An epoch of the demo takes 40 ms: "0.0 s" read as unmeasured.)"""
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 0.9995:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {s:02d}s"
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m"


def near_miss(word: str, known) -> str:
    """` (did you mean 'console'?)` for a typo of one of `known` (`consol`), else ""."""
    import difflib

    # a name in other case first: `LR` for `lr` is a typo whose two letters are too few for difflib's ratio
    near = [name for name in known if isinstance(name, str) and name.lower() == word.lower()] or \
        difflib.get_close_matches(word, list(known), n=1, cutoff=0.8)
    return f" (did you mean {near[0]!r}?)" if near else ""


def cut_utf8(text: str, max_bytes: int) -> str:
    """`text` as at most max_bytes of UTF-8: when longer, cut at a character's start, TRUNCATED saying how many
    characters were cut."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= max_bytes:
        return text
    end = max(0, max_bytes - len(TRUNCATED.format(len(text))))  # the marker is ASCII, as long as any it can get
    while end and raw[end] & 0xC0 == 0x80:  # a continuation byte: inside a character
        end -= 1
    kept = raw[:end].decode("utf-8", "surrogatepass")
    return kept + TRUNCATED.format(len(text) - len(kept))
