"""The Ollama Modelfile of an export: FROM the GGUF, a TEMPLATE that rebuilds the run's prompt, SYSTEM
with the run's instruction and label list, the stop strings and decoding defaults of its eval.

The TEMPLATE is derived, not written per model family: the run's own prompt (tasks/prompts.py, through
the tokenizer's chat template or PLAIN_TEMPLATE, few-shot examples included) is rendered once with a
sentinel character standing for the system text and one for the user input, and once with no system
text; the sentinels become `{{ .System }}` / `{{ .Prompt }}` and the part that only appears with a
system text goes inside `{{ if .System }}...{{ end }}`. Everything else is literal text, with `{{`
escaped so that text from the data (worked examples) can never become a template action. The template
ends where the answer starts: Ollama appends the response.

Quoting follows Ollama's Modelfile parser (parser/parser.go in ollama/ollama), mirrored here by
`parse_modelfile`: a value runs to the end of a line, or across lines when it opens with `"` or `\"\"\"`
and until a line ends with the matching quote. There is no escape character, so a value that cannot
be quoted to parse back exactly (a `\"\"\"` inside a text, a character Ollama's parser drops) is refused
with an InputError naming where it came from. Each value written is parsed back and compared.

`check_export` is the export's own proof: for every test row, `render_template(TEMPLATE, SYSTEM, input)`
must equal the prompt tunesmith renders for it, and `check_modelfile` must find nothing.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from dataclasses import dataclass

from tunesmith.config import GenerationSettings
from tunesmith.data.examples import Example
from tunesmith.errors import InputError
from tunesmith.models.tokens import control_strings, stop_ids
from tunesmith.tasks.predict import answer_budget
from tunesmith.tasks.prompts import PromptFormat, encode_prompt, render_prompt

MODELFILE = "Modelfile"
# Stand-ins for the system text and the user input while the run's prompt renders: private-use
# characters no chat template writes (checked: each must come out exactly once).
_SYSTEM, _PROMPT = "\U000f0001", "\U000f0002"
_ACTIONS = {_SYSTEM: "{{ .System }}", _PROMPT: "{{ .Prompt }}"}

# Ollama's api.Options (and its Runner part), by value type; DEPRECATED ones are accepted with a warning
# and ignored, so a Modelfile of ours must not rely on them.
PARAMETERS = {
    "num_keep": "int", "seed": "int", "num_predict": "int", "top_k": "int", "top_p": "float", "min_p": "float",
    "typical_p": "float", "repeat_last_n": "int", "temperature": "float", "repeat_penalty": "float",
    "presence_penalty": "float", "frequency_penalty": "float", "stop": "string",
    "num_ctx": "int", "num_batch": "int", "num_gpu": "int", "main_gpu": "int", "use_mmap": "bool", "num_thread": "int",
}
DEPRECATED = ("penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock",
              "mirostat", "mirostat_tau", "mirostat_eta")
COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
            "message", "requires")
ROLES = ("system", "user", "assistant")
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:inf|infinity|nan)", re.I)
_BOOL = ("1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False")
_SEMVER = re.compile(r"v?[0-9]+(\.[0-9]+){0,2}(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?")
_BLOCKS = ("if", "range", "with", "block", "define")


@dataclass
class ModelfileCheck:
    """What the export's check of its Modelfile found: test rows compared, rows whose Ollama prompt
    differs from tunesmith's, rows skipped (chat rows: the TEMPLATE holds one user turn), rows whose
    prompt tunesmith cuts to max_length (Ollama gets the whole input) and grammar problems."""

    rows: int
    mismatches: int
    skipped: int
    truncated: int
    problems: list[str]
    first_mismatch: dict | None = None

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and not self.problems


# --- writing -------------------------------------------------------------------------------------

def modelfile(fmt: PromptFormat, tokenizer, gguf_name: str, generation: GenerationSettings | None = None,
              max_new_tokens: int = 64) -> str:
    """The Modelfile text for the GGUF file `gguf_name` (beside the Modelfile) of a run with prompt
    format `fmt` and eval settings `generation` / `max_new_tokens`.

    Raises:
        InputError: a text (instruction, label, worked example, stop string) that a Modelfile cannot
            hold exactly, or a chat template that does not place the system text and input verbatim.
    """
    settings = generation or GenerationSettings()
    if not gguf_name or any(c in gguf_name for c in "/\\\r\n") or gguf_name.strip() != gguf_name:
        raise InputError(f"GGUF file name {gguf_name!r} must be a plain file name", "gguf_name")
    _refuse_control_text(fmt, tokenizer)
    lines = ["# Made by `tunesmith export --format ollama` from the run's prompt.json and eval settings;",
             "# export.json records how this TEMPLATE was checked against the run's own prompts.",
             f"FROM {_quote('./' + gguf_name, 'FROM', 'gguf_name', plain=True)}",
             f"TEMPLATE {_quote(prompt_template(fmt, tokenizer), 'TEMPLATE', _template_where(fmt), triple=True)}"]
    system = fmt.system_text()
    if system:
        lines.append(f"SYSTEM {_quote(system, 'SYSTEM', 'task.instruction / labels', triple=True)}")
    for stop in stop_strings(tokenizer, settings):
        lines.append(f"PARAMETER stop {_quote(stop, 'PARAMETER stop', 'eval.generation.stop')}")
    for name, value in parameters(fmt, tokenizer, settings, max_new_tokens):
        lines.append(f"PARAMETER {name} {value}")
    text = "\n".join(lines) + "\n"
    problems = check_modelfile(text)
    if problems:  # every value was parsed back above; this is a defect, not bad input
        raise RuntimeError("the Modelfile written does not pass its own check: " + "; ".join(problems))
    return text


def _refuse_control_text(fmt: PromptFormat, tokenizer) -> None:
    """InputError for an instruction, label or worked example holding a control-token string
    (`<|im_end|>`...). tunesmith encodes such text as literal characters, but Ollama tokenizes the
    whole rendered prompt with special tokens parsed: in the SYSTEM or TEMPLATE text it would end the
    system turn and open another, written by the data, in every prompt."""
    controls = control_strings(tokenizer)
    texts = [("task.instruction", fmt.instruction)] + [("task.labels (or the data's labels)", label)
                                                         for label in fmt.labels or []]
    texts += [("the worked examples (shots in prompt.json)", shot[k])
              for shot in fmt.shots for k in ("input", "output")]
    for where, text in texts:
        found = next((c for c in controls if c in text), None)
        if found is not None:
            raise InputError(f"the text {text[:60]!r} holds the control token {found!r}, which Ollama would read as "
                             "that token, not as text (it parses special tokens in the whole prompt)", where,
                             "remove the token from it, or export --format gguf and write the Modelfile by hand")


def prompt_template(fmt: PromptFormat, tokenizer) -> str:
    """The Go template (Ollama's TEMPLATE) that renders the run's prompt for one user input.

    Raises:
        InputError: the chat template does not write the system text and the input once, verbatim.
    """
    probe = Example(_PROMPT, "", "ollama")
    with_system = render_prompt(tokenizer, dataclasses.replace(fmt, instruction=_SYSTEM, list_labels=False), probe)
    without = render_prompt(tokenizer, dataclasses.replace(fmt, instruction="", list_labels=False), probe)
    if (with_system.count(_SYSTEM), with_system.count(_PROMPT), without.count(_PROMPT)) != (1, 1, 1) \
            or _SYSTEM in without:
        raise InputError("the chat template does not write the system text and the input once each, as they are; "
                         "it cannot be expressed as an Ollama TEMPLATE", "tokenizer chat_template",
                         "export --format gguf and give Ollama a TEMPLATE by hand")
    head = _common_prefix(with_system, without)
    tail = _common_prefix(with_system[head:][::-1], without[head:][::-1])
    only_without = without[head:len(without) - tail]
    while not only_without and head and with_system[head - 1] == with_system[len(with_system) - tail - 1]:
        # The system part is an insertion; start it as early as it can go ("<|im_start|>system..." whole).
        head, tail = head - 1, tail + 1
    tokens = (_tokens(with_system[:head]) + [(True, "{{ if .System }}")]
              + _tokens(with_system[head:len(with_system) - tail])
              + ([(True, "{{ else }}")] + _tokens(only_without) if only_without else [])
              + [(True, "{{ end }}")] + _tokens(with_system[len(with_system) - tail:]))
    return _join(tokens)


def stop_strings(tokenizer, settings: GenerationSettings) -> list[str]:
    """The strings generation stops at: the EOS and end-of-turn tokens (models/tokens.stop_ids) as text,
    then eval.generation.stop, without repeats."""
    out: list[str] = []
    for text in [tokenizer.decode([i], skip_special_tokens=False) for i in stop_ids(tokenizer)] + list(settings.stop):
        if text and text not in out:
            out.append(text)
    return out


def parameters(fmt: PromptFormat, tokenizer, settings: GenerationSettings,
               max_new_tokens: int) -> list[tuple[str, str]]:
    """PARAMETER lines (name, value) reproducing the run's eval decoding.

    Everything is written out because Ollama's defaults differ from greedy decoding with transformers
    (temperature 0.8, top_k 40, top_p 0.9, repeat_penalty 1.1). num_ctx is the run's prompt budget plus
    the answer length, the most context its eval used."""
    budget = fmt.max_length - answer_budget(tokenizer, fmt)
    out = [("temperature", _number(settings.temperature))]
    if not settings.greedy:
        out += [("top_p", _number(settings.top_p)), ("top_k", str(settings.top_k))]
        if settings.seed is not None:
            out.append(("seed", str(settings.seed)))
    out.append(("repeat_penalty", _number(settings.repetition_penalty)))
    if settings.repetition_penalty != 1.0:
        out.append(("repeat_last_n", "-1"))  # transformers penalises every earlier token; -1 = the whole context
    return out + [("num_predict", str(max_new_tokens)), ("num_ctx", str(budget + max_new_tokens))]


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _template_where(fmt: PromptFormat) -> str:
    return "the tokenizer's chat template" + (" or the worked examples (shots in prompt.json)" if fmt.shots else "")


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tokens(text: str) -> list[tuple[bool, str]]:
    """`text` (with sentinels) as (is_action, source) pieces: sentinels become `{{ .System }}` /
    `{{ .Prompt }}`, the rest stays literal."""
    return [(piece in _ACTIONS, _ACTIONS.get(piece, piece))
            for piece in re.split(f"([{_SYSTEM}{_PROMPT}])", text) if piece]


def _join(tokens: list[tuple[bool, str]]) -> str:
    """Go template source of the pieces, literal text escaped: each "{{" as the string-literal action
    {{ "{{" }}, and a "{" right before an action as {{ "{" }} (else it would join the action's "{{").
    Nothing in literal text can then open an action: text from the data stays text."""
    merged: list[tuple[bool, str]] = []
    for is_action, source in tokens:
        if merged and not is_action and not merged[-1][0]:
            merged[-1] = (False, merged[-1][1] + source)
        else:
            merged.append((is_action, source))
    out = []
    for i, (is_action, source) in enumerate(merged):
        if not is_action:
            source = source.replace("{{", '{{ "{{" }}')
            if source.endswith("{") and i + 1 < len(merged):
                source = source[:-1] + '{{ "{" }}'
        out.append(source)
    return "".join(out)


def _quote(value: str, command: str, where: str, triple: bool = False, plain: bool = False) -> str:
    """`value` written for a Modelfile so that Ollama's parser reads back exactly `value`.

    Raises:
        InputError: no quoting does (the parser has no escapes).
    """
    for ch in value:
        if ch not in "\t\r\n" and not _is_print(ch):
            raise InputError(f"{command} text holds the character U+{ord(ch):04X}, which Ollama's Modelfile parser "
                             "drops", where, "remove it, or export --format gguf and write the Modelfile by hand")
    if triple and '"""' in value:
        raise InputError(f'{command} text holds """, which ends a Modelfile string early (Modelfiles have no '
                         "escapes)", where, 'remove the """ from it')
    candidates = [value] if plain else []
    candidates += ['"""' + value + '"""'] if triple else ['"' + value + '"', '"""' + value + '"""']
    for quoted in candidates:
        try:
            parsed = parse_modelfile(f"FROM x\n{command} {quoted}\n")
        except ModelfileSyntaxError:
            continue
        if len(parsed) == 2 and parsed[1][1] == value:
            return quoted
    raise InputError(f"{command} text {value[:40]!r} cannot be quoted so that Ollama's Modelfile parser reads it "
                     "back unchanged", where, "remove quotes and line breaks at its ends")


# --- Ollama's Modelfile grammar --------------------------------------------------------------------

class ModelfileSyntaxError(ValueError):
    """A Modelfile Ollama's parser rejects; `line` is 1-based (0: the whole file)."""

    def __init__(self, msg: str, line: int = 0):
        super().__init__(f"line {line}: {msg}" if line else msg)
        self.line = line


def _is_print(ch: str) -> bool:
    """Go's unicode.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def parse_modelfile(text: str) -> list[tuple[str, str, int]]:
    """Commands (name, argument, line) as Ollama's parser reads them: names lower-case, FROM as
    "model", a PARAMETER as its own name, a MESSAGE as "message" with "role: content".

    A state machine over characters, as ollama/ollama parser/parser.go (ParseFile) is written.

    Raises:
        ModelfileSyntaxError: what Ollama would refuse.
    """
    state, buf, name, role, line, start = "nil", [], "", "", 1, 1
    commands: list[tuple[str, str, int]] = []
    for ch in text.removeprefix("\ufeff"):
        if ch in "\r\n":
            line += 1
        nxt, keep = _next_state(ch, state, line, buf)
        if nxt != state:
            if state == "name":
                word = "".join(buf).lower()
                if word not in COMMANDS:
                    raise ModelfileSyntaxError(f"unknown command {''.join(buf)!r} (must be one of "
                                               f"{', '.join(COMMANDS)})", line)
                name, start = ("model" if word == "from" else word), line
                nxt = {"parameter": "parameter", "message": "message"}.get(word, nxt)
            elif state == "parameter":
                name = "".join(buf)
            elif state == "message":
                role = "".join(buf)
                if role not in ROLES:
                    raise ModelfileSyntaxError(f"message role must be one of {', '.join(ROLES)}", line)
            elif state == "value":
                value, ok = _unquote("".join(buf).strip(" \t\r\n"))
                if not ok or ch in " \t":
                    buf.append(ch)
                    continue
                commands.append((name, f"{role}: {value}" if role else value, start))
                role = ""
            buf, state = [], nxt
        if keep and _is_print(keep):
            buf.append(keep)
    if state == "value":
        value, ok = _unquote("".join(buf).strip(" \t\r\n"))
        if not ok:
            raise ModelfileSyntaxError(f"unterminated quoted value of the command on line {start}")
        commands.append((name, f"{role}: {value}" if role else value, start))
    elif state not in ("nil", "comment"):
        raise ModelfileSyntaxError("unexpected end of file")
    if not any(c[0] == "model" for c in commands):
        raise ModelfileSyntaxError("no FROM line")
    return commands


def _next_state(ch: str, state: str, line: int, buf: list[str]) -> tuple[str, str]:
    """(next state, character kept) for one character, as parser.go's parseRuneForState."""
    space, newline = ch in " \t", ch in "\r\n"
    if state == "nil":
        return ("comment", "") if ch == "#" else ("nil", "") if space or newline else ("name", ch)
    if state == "name":
        if ch.isascii() and ch.isalpha():
            return "name", ch
        if space:
            return "value", ""
        raise ModelfileSyntaxError(f"a command name must be letters followed by a space, got "
                                   f"{''.join(buf) + ch!r}", line)
    if state == "value":
        return ("nil", ch) if space or newline else ("value", ch)
    if state in ("parameter", "message"):
        if ch.isascii() and (ch.isalpha() or (state == "parameter" and (ch.isdigit() or ch == "_"))):
            return state, ch
        if space:
            return "value", ""
        raise ModelfileSyntaxError(f"unexpected {ch!r} in a {state.upper()} name", line)
    return ("nil", "") if newline else ("comment", "")


def check_modelfile(text: str) -> list[str]:
    """Problems Ollama would have with this Modelfile (empty when none): its parser's errors, unknown
    or deprecated PARAMETER names, values of the wrong type, characters its parser drops, and TEMPLATE
    actions that do not close or blocks without their {{ end }}."""
    problems = [f"line {n}: character U+{ord(c):04X} is dropped by Ollama's parser"
                for n, row in enumerate(text.removeprefix("\ufeff").split("\n"), 1)
                for c in row if c not in "\t\r" and not _is_print(c)]
    try:
        commands = parse_modelfile(text)
    except ModelfileSyntaxError as e:
        return problems + [str(e)]
    for name, value, line in commands:
        problem = _command_problem(name, value)
        if problem:
            problems.append(f"line {line}: {problem}")
    return problems


def _command_problem(name: str, value: str) -> str | None:
    if name == "template":
        return template_problem(value)
    if name == "requires":
        return None if _SEMVER.fullmatch(value) else f"REQUIRES {value!r} is not a version like 0.14.0"
    if name in ("model", "adapter", "draft") and not value:
        return f"{name.upper() if name != 'model' else 'FROM'} needs a model name or path"
    if name in COMMANDS or name == "model":
        return None
    if name in DEPRECATED:
        return f"PARAMETER {name} is deprecated (Ollama ignores it)"
    kind = PARAMETERS.get(name)
    if kind is None:
        return f"unknown PARAMETER {name!r}"
    valid = {"int": lambda v: bool(_INT.fullmatch(v)) and abs(int(v)) < 2**63,
             "float": lambda v: bool(_FLOAT.fullmatch(v)) and (abs(float(v)) <= 3.4028235e38 or "inf" in v.lower()),
             "bool": lambda v: v in _BOOL, "string": lambda v: True}[kind]
    return None if valid(value) else f"PARAMETER {name} needs a {kind}, got {value!r}"


def template_problem(template: str) -> str | None:
    """Whether a Go template's actions close and its blocks end (not a full Go template parser)."""
    depth, pos = 0, 0
    while (start := template.find("{{", pos)) >= 0:
        end = _action_end(template, start + 2)
        if end < 0:
            return f"TEMPLATE action at character {start} is not closed with }}}}"
        words = template[start + 2:end].strip("- \t\r\n").split()
        if words and words[0] in _BLOCKS:
            depth += 1
        elif words and words[0] in ("end", "else") and depth == 0:
            return f"TEMPLATE {{{{ {words[0]} }}}} at character {start} has no block to close"
        elif words and words[0] == "end":
            depth -= 1
        pos = end + 2
    return f"TEMPLATE has {depth} block(s) without {{{{ end }}}}" if depth else None


def _action_end(template: str, i: int) -> int:
    """Index of the `}}` closing the action whose text starts at `i` (quoted strings skipped), or -1."""
    quote = None
    while i < len(template):
        c = template[i]
        if quote:
            if c == "\\" and quote != "`":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif template.startswith("}}", i):
            return i
        i += 1
    return -1


# --- rendering and the export's check --------------------------------------------------------------

def _actions(template: str):
    """(start, end, text inside) of each {{ ... }} action, left to right, as a lazy regex would find
    them but in linear time (a regex rescans to the end from every unclosed {{)."""
    pos = 0
    while (start := template.find("{{", pos)) != -1:
        end = template.find("}}", start + 2)
        if end == -1:
            return
        yield start, end + 2, template[start + 2:end]
        pos = end + 2


def render_template(template: str, system: str, prompt: str) -> str:
    """What Ollama renders from `template` for one user turn (its response empty): the subset of Go's
    text/template this module writes ({{ .System }}, {{ .Prompt }}, {{ .Response }}, string literals,
    {{ if .System }} / {{ if .Prompt }} ... {{ else }} ... {{ end }}).

    Raises:
        ValueError: an action outside that subset.
    """
    values = {".System": system, ".Prompt": prompt, ".Response": ""}
    out: list[str] = []
    stack: list[bool] = []  # per open if: whether its branch now being read is taken
    pos = 0
    for start, end, inner in _actions(template):
        if all(stack):
            out.append(template[pos:start])
        pos = end
        words = inner.split(maxsplit=1)
        if len(words) == 1 and words[0] in values:
            out.append(values[words[0]] if all(stack) else "")
        elif len(words) == 1 and re.fullmatch(r'"[^"\\]*"', words[0]):
            out.append(words[0][1:-1] if all(stack) else "")
        elif len(words) == 2 and words[0] == "if" and words[1].strip() in values:
            stack.append(bool(values[words[1].strip()]))
        elif words == ["else"] and stack:
            stack[-1] = not stack[-1]
        elif words == ["end"] and stack:
            stack.pop()
        else:
            raise ValueError(f"template action {template[start:end]!r} is outside the subset render_template "
                             "knows")
    if stack:
        raise ValueError("template has an {{ if }} without {{ end }}")
    return "".join(out) + template[pos:]


def modelfile_values(text: str) -> tuple[str, str]:
    """(TEMPLATE, SYSTEM) of a Modelfile as Ollama reads them ("" when absent; the last one wins)."""
    values = {name: value for name, value, _ in parse_modelfile(text) if name in ("template", "system")}
    return values.get("template", ""), values.get("system", "")


def check_export(text: str, fmt: PromptFormat, tokenizer, examples: list[Example]) -> ModelfileCheck:
    """Check a Modelfile against the run: its grammar, and for every example with a single input
    (chat rows are counted as skipped) whether Ollama's prompt equals the one tunesmith renders."""
    problems = check_modelfile(text)
    if problems:
        return ModelfileCheck(len(examples), 0, 0, 0, problems)
    template, system = modelfile_values(text)
    budget = fmt.max_length - answer_budget(tokenizer, fmt)
    mismatches = skipped = truncated = 0
    first = None
    for i, ex in enumerate(examples):
        if ex.messages is not None:
            skipped += 1
            continue
        expected, got = render_prompt(tokenizer, fmt, ex), render_template(template, system, ex.input)
        truncated += encode_prompt(tokenizer, fmt, ex, budget)[1]
        if got != expected:
            mismatches += 1
            first = first or {"row": i, "expected": expected, "ollama": got}
    return ModelfileCheck(len(examples), mismatches, skipped, truncated, [], first)
