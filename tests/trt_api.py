"""A fake ``tensorrt`` held to the real API of one TensorRT version.

The tests' fakes (``make_fake_trt`` in test_trt_engine.py and test_trt_runtime.py) implement
behaviour; this module makes them honest about names. ``Api(surface)`` reads the API surface that
``trt_bindings.py`` dumped from the real bindings of one version; ``checked(api, fake)`` wraps a
fake module so that

* a module attribute, class member or enum member that the real version lacks raises
  AttributeError, as the real module would, and is recorded in ``api.misses`` (so a missing name
  that the code under test swallows still fails the test, see ``Api.assert_clean``);
* a name the real version has but the fake lacks, a call whose argument count, keyword names or
  enum/int/str argument types match none of the real pybind11 signatures, an assignment to a
  read-only property, or constructing a class TensorRT gives no constructor raises ApiViolation
  (a BaseException: ``except Exception`` in the code under test cannot hide it);
* return values and properties whose real type is a TensorRT class come back wrapped as that
  class, so ``builder.create_network()`` is checked as an ``INetworkDefinition`` from then on.

``enums(api)`` gives the fakes every enum of the real version with its real members and values
(a 10.3 ``BuilderFlag`` has FP16 and REFIT_INDIVIDUAL, an 11.4 one has no FP16, an 8.6
``MemoryPoolType`` has TACTIC_DRAM). Standard library only.
"""

from __future__ import annotations

import re


class ApiViolation(BaseException):
    """The code under test (or a fake) used TensorRT in a way the real version does not allow."""


_PREFIX_RE = re.compile(r"^(?:(?:tensorrt_bindings|tensorrt)\.)+")
_BUILTIN = (int, float, str, bytes, bytearray, memoryview, bool, tuple, list, dict, type(None))


class Api:
    """The API surface of one real TensorRT version, and what the checked fake saw of it."""

    def __init__(self, surface: dict):
        self.surface = surface
        self.version = str(surface["version"])
        self.major = int(self.version.split(".")[0])
        self.classes: dict = surface["classes"]
        self.enum_members: dict[str, dict[str, int]] = surface["enums"]
        self.misses: list[str] = []
        self.violations: list[str] = []

    def __repr__(self) -> str:
        return f"Api(TensorRT {self.version})"

    # ---- lookups

    def member(self, cls: str, name: str) -> dict | None:
        """The surface entry of ``cls.name`` (kind, signatures or type), None when the real class lacks it."""
        return self.classes.get(cls, {}).get("members", {}).get(name)

    def has(self, dotted: str) -> bool:
        """Whether "Class", "Class.member", "Enum.MEMBER" or a module attribute exists in this version."""
        if dotted in self.surface["attributes"]:
            return True
        cls, _, name = dotted.rpartition(".")
        return bool(cls) and (name in self.enum_members.get(cls, {}) or self.member(cls, name) is not None)

    def resolve(self, type_text: str) -> str | None:
        """The class or enum a pybind11 type names ("tensorrt_bindings.tensorrt.ICudaEngine",
        "nvinfer1::IEngineInspector" -> "EngineInspector"), None for builtins and containers."""
        text = (type_text or "").strip()
        m = re.fullmatch(r"Optional\[(.+)\]", text) or re.fullmatch(r"(.+?) \| None", text)
        text = m.group(1) if m else text
        text = re.sub(r"^(?:nvinfer1|nvonnxparser)::", "", text).replace("::", ".")
        text = _PREFIX_RE.sub("", text)
        if not re.fullmatch(r"[A-Za-z_][\w.]*", text):
            return None
        for cand in (text, text[1:] if text.startswith("I") else None, "I" + text):
            if cand and cand in self.classes:
                return cand
        return None

    # ---- records

    def miss(self, name: str, kind: str = "attribute") -> AttributeError:
        """Record that ``name`` was asked for and does not exist; the AttributeError the real module raises."""
        self.misses.append(name)
        return AttributeError(f"TensorRT {self.version} has no {kind} {name}")

    def violation(self, message: str) -> ApiViolation:
        """Record a use the real version does not allow; the ApiViolation to raise."""
        text = f"TensorRT {self.version}: {message}"
        self.violations.append(text)
        return ApiViolation(text)

    def assert_clean(self, probed=()) -> None:
        """No violation, and no missing name except those in ``probed`` (the names the code under
        test looks up with a default on purpose, like ``BuilderFlag.FP16``)."""
        unexpected = sorted(set(self.misses) - set(probed))
        assert not self.violations, self.violations
        assert not unexpected, f"TensorRT {self.version} has none of {unexpected}, which the code used"

    # ---- calls

    def check_call(self, where: str, signatures: list[dict], args: tuple, kwargs: dict) -> dict | None:
        """The first real signature that ``args``/``kwargs`` fit (None when the real member has
        none to check against); ApiViolation when none fits."""
        if not signatures:
            return None
        problems = []
        for sig in signatures:
            why = self._bind(sig["params"], args, kwargs)
            if why is None:
                return sig
            problems.append(f"{sig['text']} ({why})")
        shown = ", ".join([*(repr(_unwrap(a)) for a in args), *(f"{k}={_unwrap(v)!r}" for k, v in kwargs.items())])
        raise self.violation(f"{where}({shown}) fits no real signature: " + "; ".join(problems))

    def _bind(self, params: list[dict], args: tuple, kwargs: dict) -> str | None:
        """Why args/kwargs do not fit ``params`` (pybind11's rules), or None when they do."""
        positional = [p for p in params if p["kind"] in ("positional", "any")]
        if len(args) > len(positional) and not any(p["kind"] == "varargs" for p in params):
            return f"{len(args)} positional arguments, at most {len(positional)}"
        given = {}
        for p, a in zip(positional, args):
            given[p["name"]] = (p, a)
        by_name = {p["name"]: p for p in params}
        for k, v in kwargs.items():
            p = by_name.get(k)
            if p is None or p["kind"] in ("varargs", "varkw"):
                if any(q["kind"] == "varkw" for q in params):
                    continue
                return f"no keyword {k!r}"
            if p["kind"] == "positional":
                return f"{k!r} cannot be passed by keyword"
            if k in given:
                return f"{k!r} given twice"
            given[k] = (p, v)
        for p in params:
            if p["kind"] in ("positional", "any", "keyword") and not p["default"] and p["name"] not in given:
                return f"missing {p['name']!r}"
        for name, (p, value) in given.items():
            why = self._type_problem(p["type"], _unwrap(value))
            if why:
                return f"{name}: {why}"
        return None

    def _type_problem(self, type_text: str, value) -> str | None:
        """What pybind11 would reject: another enum (or a bare int) for an enum, a non-int for an
        int, a non-str for a str. Other types are not checked."""
        text = _PREFIX_RE.sub("", type_text.strip())
        qual = self.resolve(type_text)
        if qual in self.enum_members:
            if getattr(value, "_enum", None) != qual:
                return f"expected a {qual} member, got {value!r}"
            return None
        if text in ("int", "typing.SupportsInt"):
            if isinstance(value, float) or not hasattr(value, "__index__"):
                return f"expected an int, got {value!r}"
        if text == "str" and not isinstance(value, str):
            return f"expected a str, got {value!r}"
        return None

    def wrap(self, value, type_text: str):
        """``value`` as the checked TensorRT class its real type names, when it is one."""
        qual = self.resolve(type_text)
        if qual is None or qual in self.enum_members or isinstance(value, _BUILTIN) or isinstance(value, _Checked):
            return value
        if getattr(value, "_enum", None):
            return value
        return Instance(self, qual, value)


# --------------------------------------------------------------------------------------------
# enums with the real members


class FakeEnumMember(int):
    """One member of a derived enum: an int with pybind11's ``name`` and ``value``."""

    _enum = ""
    name = ""

    @property
    def value(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        return f"<{self._enum.rsplit('.', 1)[-1]}.{self.name}: {int(self)}>"

    __str__ = __repr__

    def __eq__(self, other) -> bool:
        # pybind11 enum members are equal to members of the same enum with the same value
        if isinstance(other, FakeEnumMember):
            return other._enum == self._enum and int(other) == int(self)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self._enum, int(self)))


def make_enum(qual: str, members: dict[str, int]) -> type:
    """A class with one FakeEnumMember attribute per real member (aliases keep their own name)."""
    cls = type(qual.rsplit(".", 1)[-1], (FakeEnumMember,), {"_enum": qual, "__members__": {}})
    for name, value in members.items():
        m = cls(value)
        m.name = name
        cls.__members__[name] = m
        setattr(cls, name, m)
    return cls


def enums(api: Api) -> dict[str, type]:
    """qualified name ("BuilderFlag", "ILogger.Severity") -> derived enum class, every enum of the version."""
    return {qual: make_enum(qual, members) for qual, members in api.enum_members.items()}


# --------------------------------------------------------------------------------------------
# the checked proxies


class _Checked:
    """Base of the proxies; ``_target`` is what the fake gave."""

    __slots__ = ("_api", "_qual", "_target")

    def __init__(self, api: Api, qual: str, target):
        object.__setattr__(self, "_api", api)
        object.__setattr__(self, "_qual", qual)
        object.__setattr__(self, "_target", target)

    def __repr__(self) -> str:
        return f"<checked {self._qual} of TensorRT {self._api.version}: {self._target!r}>"


def _dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def _unwrap(value):
    if isinstance(value, _Checked):
        return value._target
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v) for v in value)
    return value


class Method(_Checked):
    """A bound (or, from a class, unbound) method whose calls are checked against the real signatures."""

    __slots__ = ("_signatures", "_unbound")

    def __init__(self, api: Api, qual: str, target, signatures: list[dict], unbound: bool = False):
        super().__init__(api, qual, target)
        object.__setattr__(self, "_signatures", signatures)
        object.__setattr__(self, "_unbound", unbound)

    def __call__(self, *args, **kwargs):
        checked_args = args[1:] if self._unbound else args
        sig = self._api.check_call(self._qual, self._signatures, checked_args, kwargs)
        result = self._target(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()})
        return self._api.wrap(result, sig["returns"]) if sig else result


def _member_value(api: Api, qual: str, name: str, target, unbound: bool):
    """What reading ``qual.name`` gives: AttributeError (and a miss) when the real class lacks it,
    ApiViolation when the fake lacks what the real class has."""
    m = api.member(qual, name)
    if m is None and name not in api.enum_members.get(qual, {}):
        if _dunder(name):  # Python's own probes (__array__, __spec__, ...): not the code's use of TensorRT
            raise AttributeError(name)
        raise api.miss(f"{qual}.{name}")
    try:
        value = getattr(target, name)
    except AttributeError:
        raise api.violation(f"the fake {qual} lacks {name}, which the real one has: add it to the fake") from None
    if m is None:  # an enum member
        return value
    if m["kind"] == "method":
        return Method(api, f"{qual}.{name}", value, m["signatures"], unbound=unbound)
    if m["kind"] == "property":
        return api.wrap(value, m["type"])
    if m["kind"] == "enum":
        return Class(api, f"{qual}.{name}", value)
    return value


class Instance(_Checked):
    """An object of the real class ``qual`` (what the fake returned where TensorRT returns one)."""

    __slots__ = ()

    def __getattr__(self, name: str):
        return _member_value(self._api, self._qual, name, self._target, unbound=False)

    def __setattr__(self, name: str, value) -> None:
        m = self._api.member(self._qual, name)
        if m is None or m["kind"] != "property" or not m["writable"]:
            raise self._api.miss(f"{self._qual}.{name}", "settable property")
        why = self._api._type_problem(m["type"], _unwrap(value))
        if why:
            raise self._api.violation(f"{self._qual}.{name} = {value!r}: {why}")
        setattr(self._target, name, _unwrap(value))


class Class(_Checked):
    """A real class (or enum): attribute access, construction, subclassing, isinstance, all checked."""

    __slots__ = ()

    def __getattribute__(self, name: str):
        if name == "__init__":  # ``Base.__init__(self)`` in a subclass: the real class's, not the proxy's
            get = object.__getattribute__
            return _member_value(get(self, "_api"), get(self, "_qual"), name, get(self, "_target"), unbound=True)
        return object.__getattribute__(self, name)

    def __getattr__(self, name: str):
        return _member_value(self._api, self._qual, name, self._target, unbound=True)

    def __call__(self, *args, **kwargs):
        init = self._api.member(self._qual, "__init__")
        sigs = (init or {}).get("signatures", [])
        if not sigs:
            raise self._api.violation(f"{self._qual} has no Python constructor in real TensorRT")
        sig = self._api.check_call(self._qual, sigs, args, kwargs)
        obj = self._target(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()})
        return self._api.wrap(obj, sig["returns"] if sig and sig["returns"] != "None" else self._qual)

    def __instancecheck__(self, obj) -> bool:
        return isinstance(_unwrap(obj), self._target)

    def __mro_entries__(self, bases):
        """``class MyLogger(trt.ILogger)``: the subclass derives from the fake class, and its
        overrides of real methods must accept the arguments TensorRT passes them."""
        api, qual = self._api, self._qual

        def __init_subclass__(sub, **kw):
            for name, fn in vars(sub).items():
                m = api.member(qual, name)
                if name.startswith("_") or not callable(fn) or not m or m["kind"] != "method":
                    continue
                import inspect

                arity = {len(s["params"]) for s in m["signatures"]}
                params = list(inspect.signature(fn).parameters.values())[1:]
                if arity and len(params) not in arity and not any(p.kind == p.VAR_POSITIONAL for p in params):
                    raise api.violation(f"{sub.__name__}.{name} takes {len(params)} arguments; TensorRT calls "
                                        f"{qual}.{name} with {sorted(arity)}")

        checked_base = type(self._target.__name__, (self._target,), {"__init_subclass__": classmethod(__init_subclass__)})
        return (checked_base,)


class Module(_Checked):
    """The checked ``tensorrt`` module: put it in ``sys.modules["tensorrt"]``."""

    __slots__ = ("_cache",)

    def __init__(self, api: Api, fake):
        super().__init__(api, "tensorrt", fake)
        object.__setattr__(self, "_cache", {})

    def __getattr__(self, name: str):
        if name in self._cache:
            return self._cache[name]
        api = self._api
        kind = api.surface["attributes"].get(name)
        if kind is None:
            if _dunder(name):
                raise AttributeError(name)
            raise api.miss(name, "module attribute")
        try:
            value = getattr(self._target, name)
        except AttributeError:
            raise api.violation(f"the fake module lacks {name}, which the real one has: add it to the fake") from None
        if kind in ("class", "enum"):
            value = Class(api, name, value)
        elif kind == "function":
            value = Method(api, name, value, api.surface["functions"].get(name, []))
        self._cache[name] = value
        return value


def checked(api: Api, fake) -> Module:
    """``fake`` (a module-like object) seen through the real API of ``api``'s version."""
    return Module(api, fake)
