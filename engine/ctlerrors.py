"""Errors across a process boundary: raised in a child, raised again as themselves.

The engine's children (the postcopy fault handler, multifd workers) report a
failure to their coordinator over a control socket.  Rebuilding it there from
a class name and a line of text loses what the error knows (a
:class:`~engine.errors.ProtocolError`'s channel and offset, an
:class:`~engine.errors.InvalidParameterError`'s name) and needs a table of
the kinds each coordinator expects.  Here the error travels whole:

* :func:`pack_error` turns an exception into bytes: its class (module and
  name), ``str()``, its attributes (those JSON can carry; others as their
  ``repr``) and its ``__cause__`` (an ``OSError``'s errno and text, or
  another engine error), as one JSON document;
* :func:`unpack_error` gives back an exception of the *same class* with the
  same attributes and text, so ``except RemoteProtocolError as exc:
  exc.channel`` works in the coordinator as in the child.

Only :class:`~engine.errors.EngineError` subclasses from the engine's own
modules are rebuilt as themselves; anything else (a bug: ``KeyError``,
``ValueError``) arrives as the caller's *fallback* class, its text naming the
original type.  Instances are made without calling ``__init__`` (whose
signature differs per class), then given the sent ``args`` and attributes:
what the child's instance had is what the coordinator's has.

Sans-I/O: bytes in, bytes out; the socket is the caller's.
"""
from __future__ import annotations

import builtins
import importlib
import json

from engine.errors import EngineError, RemoteProtocolError

__all__ = ["pack_error", "unpack_error"]

#: how deep a chain of causes is carried (the first cause says why; a
#: longer chain is a traceback's business)
_CAUSE_DEPTH = 2


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)) and all(
            v is None or isinstance(v, (str, int, float, bool)) for v in value):
        return list(value)
    return repr(value)


def _doc(exc: BaseException, depth: int) -> dict:
    cls = type(exc)
    doc: dict = {"type": f"{cls.__module__}.{cls.__qualname__}", "text": str(exc)}
    if isinstance(exc, EngineError):
        doc["args"] = [_jsonable(a) for a in exc.args]
        doc["attrs"] = {k: _jsonable(v) for k, v in vars(exc).items()
                        if not k.startswith("__")}
    elif isinstance(exc, OSError):
        doc["errno"] = exc.errno
        doc["strerror"] = exc.strerror
    cause = exc.__cause__
    if cause is not None and depth > 0:
        doc["cause"] = _doc(cause, depth - 1)
    return doc


def pack_error(exc: BaseException) -> bytes:
    """The bytes that carry *exc* to another process."""
    return json.dumps(_doc(exc, _CAUSE_DEPTH)).encode()


def _engine_class(name: str) -> type[EngineError] | None:
    """The EngineError subclass called *name* (``module.qualname``), or None."""
    module, _, qualname = name.rpartition(".")
    if module != "engine" and not module.startswith("engine."):
        return None
    try:
        obj: object = importlib.import_module(module)
    except ImportError:
        return None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if isinstance(obj, type) and issubclass(obj, EngineError):
        return obj
    return None


def _rebuild(doc: dict, fallback: type[Exception], where: str) -> BaseException:
    name, text = str(doc["type"]), str(doc["text"])
    cls = _engine_class(name)
    exc: BaseException
    if cls is not None:
        exc = cls.__new__(cls)
        exc.args = tuple(doc.get("args", (text,)))
        for key, value in dict(doc.get("attrs", {})).items():
            setattr(exc, str(key), value)
    elif "errno" in doc and (os_cls := _os_error_class(name)) is not None:
        exc = (os_cls(doc["errno"], doc["strerror"]) if doc["errno"] is not None
               else os_cls(text))
    else:
        short = name.rpartition(".")[2]
        exc = fallback(f"{where}: {short}: {text}" if where else f"{short}: {text}")
    cause = doc.get("cause")
    if isinstance(cause, dict):
        exc.__cause__ = _rebuild(cause, fallback, "")
    return exc


def _os_error_class(name: str) -> type[OSError] | None:
    """The built-in OSError (sub)class called *name* (``builtins.<name>``)."""
    module, _, short = name.rpartition(".")
    cls = getattr(builtins, short, None) if module == "builtins" else None
    return cls if isinstance(cls, type) and issubclass(cls, OSError) else None


def unpack_error(data: bytes, *, fallback: type[Exception], where: str,
                 channel: str = "control socket") -> BaseException:
    """The exception packed in *data*, to raise in this process.

    *fallback* is the class for errors that are not the engine's own (their
    text then starts with *where*, e.g. "postcopy fault handler", and the
    original type).  The rebuilt exception carries a note naming *where*.
    Malformed bytes raise :class:`RemoteProtocolError` on *channel*.
    """
    try:
        doc = json.loads(bytes(data))
        exc = _rebuild(doc, fallback, where)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise RemoteProtocolError(f"malformed error report: {err}", 0, channel) from None
    if where:
        exc.add_note(f"(raised in the {where})")
    return exc
