"""The cross-option checks a loaded configuration must pass before anything is bound.

:func:`validate` runs every check, in the process that read the configuration (the
master too, and again after a reload's re-exec); the first failure is a
:class:`~uwsgi_fastrouter.options.StartupError` naming the option, and the process
exits with status 1.  The helpers that turn a checked value into what the runtime
uses (:func:`chmod_mode`, :func:`skip_uids`, ...) are the same functions, so a value
is read one way only.
"""

from __future__ import annotations

from typing import List, Optional

from .accesslog import AccessLog, compile_format
from .addresses import INET, INET6, NAME, AddressError, parse_bind
from .allowlist import AllowListError, allow_list
from .log import log
from .names import DEFAULT_MAX_NAMES, names_in
from .options import StartupError, access_log_target, find_option
from .sockets import has_reuse_port
from .stripvars import StripRuleError, VarStripper, make_stripper
from .tlsnode import NodeTls, TlsSetupError, client_context


def validate(cfg) -> None:
    """Every check, in order; a :class:`StartupError` for the first that fails."""
    _check_something_to_do(cfg)
    _check_retries(cfg)
    _check_host_names(cfg)
    _check_access_log(cfg)
    _check_reuse_port(cfg)
    chmod_mode(cfg)
    skip_uids(cfg)
    subscribe_specs(cfg)
    subscribe_modifier1(cfg)
    source_allow_list(cfg)
    var_stripper(cfg)
    node_tls(cfg, subscriptions=False)


def _check_something_to_do(cfg) -> None:
    if not (cfg.fastrouter or cfg.fastrouter_zerg or cfg.subscribe_to or cfg.subscribe2 or cfg.socket
            or cfg.zerg):
        raise StartupError("no --fastrouter address given: nothing to route "
                           "(example: --fastrouter 127.0.0.1:3017)")


def _check_retries(cfg) -> None:
    for name in ("fastrouter-max-retries", "fastrouter-node-max-conns",
                 "fastrouter-node-max-conns-per-core", "fastrouter-node-queue-wait"):
        if getattr(cfg, name.replace("-", "_")) < 0:
            raise StartupError('invalid value for option "%s": must be >= 0' % name)


def _check_host_names(cfg) -> None:
    count = len(names_in(list(cfg.fastrouter_to) + list(cfg.fastrouter_fallback)))
    if count > DEFAULT_MAX_NAMES:
        raise StartupError("--fastrouter-to and --fastrouter-fallback name %d host names; at most "
                           "%d can be looked up" % (count, DEFAULT_MAX_NAMES))


def _check_access_log(cfg) -> None:
    """A bad --fastrouter-access-log-format or an unwritable access log file stops the
    start, in the process that reads the configuration (the master too)."""
    if cfg.fastrouter_access_log_format is not None:
        try:
            compile_format(cfg.fastrouter_access_log_format)
        except ValueError as exc:
            raise StartupError(str(exc))
    path = access_log_target(cfg.fastrouter_access_log)
    if path:
        try:
            AccessLog(cfg.fastrouter_access_log_format, path).close()
        except OSError as exc:
            raise StartupError('option "--fastrouter-access-log": unable to open %s: %s'
                               % (path, exc.strerror or exc))


def _check_reuse_port(cfg) -> None:
    """--fastrouter-reuse-port binds a socket per router process on each listener's
    address: only a TCP address can be bound more than once (SO_REUSEPORT); a UNIX
    path, a shared socket (=N), an inherited descriptor (fd://N) or the zerg server's
    sockets cannot, and are refused here rather than silently shared."""
    if cfg.reuse_port and not has_reuse_port():
        log("!!! your system does not support SO_REUSEPORT !!!")     # uWSGI goes on too
    if not cfg.fastrouter_reuse_port:
        return
    option = 'option "--fastrouter-reuse-port"'
    if not has_reuse_port():
        raise StartupError("%s: this system has no SO_REUSEPORT" % option)
    if cfg.fastrouter_zerg:
        raise StartupError("%s: the sockets of --fastrouter-zerg are lent by the zerg server "
                           "and cannot be bound once per process" % option)
    for spec in cfg.fastrouter:
        try:
            kind = parse_bind(spec, abstract_all=cfg.abstract_socket).kind
        except AddressError:
            continue        # binding reports it, naming --fastrouter
        if kind not in (INET, INET6, NAME):
            raise StartupError("%s: --fastrouter %s is not a TCP address (ip:port, [ipv6]:port or "
                               "host:port); only those can have a socket per router process"
                               % (option, spec))


def source_allow_list(cfg):
    """``--subscription-allow`` as a matcher (None: every sender may announce)."""
    try:
        return allow_list(cfg.subscription_allow)
    except AllowListError as exc:
        raise StartupError('option "--subscription-allow": %s' % exc)


def var_stripper(cfg) -> Optional[VarStripper]:
    """``--fastrouter-strip-vars`` and ``--fastrouter-strip-magic-vars`` as one stripper
    (None: the heads go out as they came)."""
    try:
        return make_stripper(cfg.fastrouter_strip_vars, cfg.fastrouter_strip_magic_vars)
    except StripRuleError as exc:
        raise StartupError('invalid value for option "fastrouter-strip-vars": %s' % exc)
def _tls_files_given(cfg) -> bool:
    return bool(cfg.fastrouter_tls_ca or cfg.fastrouter_tls_cert or cfg.fastrouter_tls_key)


def node_tls(cfg, subscriptions: bool) -> Optional[NodeTls]:
    """The TLS-to-nodes policy (tlsnode.py), or None when no node can be a TLS node:
    none is listed with --fastrouter-tls-node and no subscription server (where nodes
    may announce proto=s) is bound.  Bad files stop the start."""
    if cfg.fastrouter_tls_key and not cfg.fastrouter_tls_cert:
        raise StartupError('option "--fastrouter-tls-key" needs --fastrouter-tls-cert')
    if cfg.fastrouter_tls_no_verify and cfg.fastrouter_tls_ca:
        raise StartupError('options "--fastrouter-tls-no-verify" and "--fastrouter-tls-ca" '
                           'contradict each other: give one of them')

    def make_context():
        return client_context(cafile=cfg.fastrouter_tls_ca or None,
                              certfile=cfg.fastrouter_tls_cert or None,
                              keyfile=cfg.fastrouter_tls_key or None,
                              verify=not cfg.fastrouter_tls_no_verify,
                              server_name=cfg.fastrouter_tls_server_name or None)
    policy = None
    if cfg.fastrouter_tls_node or subscriptions:
        policy = NodeTls(make_context,
                         [a.encode("utf-8", "surrogateescape") for a in cfg.fastrouter_tls_node],
                         cfg.fastrouter_tls_server_name or None)
    if _tls_files_given(cfg):
        # Made now, so that a bad file stops the start (and never fails a request);
        # without files the context is made at the first TLS node.
        try:
            context = make_context()
        except TlsSetupError as exc:
            raise StartupError("TLS to nodes: %s" % exc)
        if policy is not None:
            policy.use_context(context)
    return policy


def chmod_mode(cfg) -> Optional[int]:
    """``--chmod-socket`` as a mode (None: leave the sockets as created)."""
    value = cfg.chmod_socket
    if value is None or value is False:
        return None
    text = str(value).strip() or find_option("chmod-socket").bare   # blank: as given bare
    try:
        return int(text, 8)
    except ValueError:
        raise StartupError('invalid value for option "chmod-socket": %r is not an octal mode' % text)


def skip_uids(cfg) -> List[int]:
    """``--subscriptions-sign-skip-uid`` as numbers."""
    try:
        return [int(u) for u in cfg.subscriptions_sign_skip_uid]
    except ValueError:
        raise StartupError('option "--subscriptions-sign-skip-uid": not a number')


def subscribe_specs(cfg) -> list:
    """The ``--subscribe-to`` then ``--subscribe2`` announces, parsed."""
    if not cfg.subscribe_to and not cfg.subscribe2:
        return []
    from .subscriber import SubscribeError, parse_subscribe2, parse_subscribe_to
    specs: list = []
    option = "subscribe-to"
    try:
        for value in cfg.subscribe_to:
            parsed = parse_subscribe_to(value)
            specs.extend(parsed if isinstance(parsed, list) else [parsed])
        option = "subscribe2"
        for value in cfg.subscribe2:
            specs.append(parse_subscribe2(value))
    except SubscribeError as exc:
        raise StartupError('option "--%s": %s' % (option, exc))
    return specs


def subscribe_modifier1(cfg) -> Optional[int]:
    """``--subscribe-with-modifier1`` as a byte (None when not given)."""
    if not cfg.subscribe_with_modifier1:
        return None
    try:
        return int(cfg.subscribe_with_modifier1) % 256
    except ValueError:
        raise StartupError('option "--subscribe-with-modifier1": not a number')
