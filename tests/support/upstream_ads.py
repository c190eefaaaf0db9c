#!/usr/bin/env python3
"""An upstream xDS management server for the proxy tests: a real ADS and ECDS server that is not
wasm-ecds, built on grpcio and the Envoy protos of xds-protos (scripts/install-test-deps.sh makes
the venv; tests/support/upstream.rs drives it).

    python upstream_ads.py [--host 127.0.0.1] [--port 0]

Serves envoy.service.discovery.v3.AggregatedDiscoveryService (SotW and delta) and
envoy.service.extension.v3.ExtensionConfigDiscoveryService (the same, restricted to
TypedExtensionConfig). stdout carries one JSON object per line, starting with
{"event":"listening","port":N}; then stream_open, request, response and stream_close events and
the answers to commands. stdin takes one JSON command per line:

    {"op":"set","type_url":T,"version":V,"resources":[R...],"seq":K}
        replaces every resource of type T; each R is the proto3 JSON of the resource with its
        "@type", or {"@raw":{"name":N,"type_url":U,"value_b64":B}} (an Any with exactly those
        bytes); an optional "@version" gives R its own version in delta responses.
    {"op":"drop_streams","seq":K}
        ends every open stream with UNAVAILABLE.

Each command is answered with {"event":"ok","seq":K} or {"event":"error","seq":K,"message":M}.
The server exits on stdin EOF or SIGTERM.

Protocol choices, where the xDS spec leaves room:
- nothing is sent for a type that was never set;
- SotW: a request whose response_nonce is neither empty nor the last one sent for its type is
  stale: recorded, otherwise ignored; a response carries every subscribed resource that exists
  (all of the type for a wildcard subscription, possibly none for names that do not exist);
- delta: a name subscribed explicitly that does not exist is listed once in removed_resources;
  the first request of a type is answered (possibly empty) once the type is set;
- a stream ends (OK) when the client closes its side.
"""

import argparse
import base64
import importlib
import itertools
import json
import os
import pkgutil
import queue
import signal
import sys
import threading
from concurrent import futures

import grpc
from google.protobuf import any_pb2, descriptor_pool, json_format, message_factory

from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.extension.v3 import config_discovery_pb2_grpc

ECDS_TYPE_URL = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
MAX_MESSAGE = 64 * 1024 * 1024

_out_lock = threading.Lock()


def emit(event, **fields):
    line = json.dumps({"event": event, **fields}, separators=(",", ":"))
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


# ------------------------------------------------------------------------------------------------
# Resources from JSON

_loaded_packages = set()


def message_class(full_name):
    """The generated class of `full_name`, importing every *_pb2 module of its proto package on
    first use (xds-protos has one Python package per proto package)."""
    pool = descriptor_pool.Default()
    try:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))
    except KeyError:
        pass
    parts = full_name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        package = ".".join(parts[:i])
        if package in _loaded_packages:
            continue
        try:
            module = importlib.import_module(package)
        except ImportError:
            continue
        _loaded_packages.add(package)
        for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
            if info.name.endswith("_pb2"):
                importlib.import_module(package + "." + info.name)
        try:
            return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))
        except KeyError:
            pass
    raise ValueError("unknown message type %s (not in xds-protos or protobuf)" % full_name)


def type_name(type_url):
    return type_url.rsplit("/", 1)[-1]


def load_nested_types(value):
    """Loads the classes of every "@type" inside `value`, so json_format resolves nested Anys."""
    if isinstance(value, dict):
        if isinstance(value.get("@type"), str):
            message_class(type_name(value["@type"]))
        for v in value.values():
            load_nested_types(v)
    elif isinstance(value, list):
        for v in value:
            load_nested_types(v)


def resource_name(message):
    for field in ("name", "cluster_name"):
        if field in message.DESCRIPTOR.fields_by_name and getattr(message, field):
            return getattr(message, field)
    raise ValueError("the %s has no name" % message.DESCRIPTOR.full_name)


def parse_resource(type_url, command_version, spec):
    """(name, version, Any) of one resource of a set command."""
    if not isinstance(spec, dict):
        raise ValueError("a resource must be a JSON object")
    spec = dict(spec)
    version = spec.pop("@version", command_version)
    if not isinstance(version, str):
        raise ValueError("@version must be a string")
    if "@raw" in spec:
        raw = spec.pop("@raw")
        if spec:
            raise ValueError("@raw takes no other keys than @version")
        any_ = any_pb2.Any(type_url=raw["type_url"], value=base64.b64decode(raw["value_b64"]))
        return raw["name"], version, any_
    url = spec.pop("@type", None)
    if url is None:
        raise ValueError("a resource needs an @type (or @raw)")
    if url != type_url:
        raise ValueError("resource @type %s in a set of %s (use @raw for that)" % (url, type_url))
    cls = message_class(type_name(url))
    load_nested_types(spec)
    message = json_format.ParseDict(spec, cls())
    any_ = any_pb2.Any(type_url=url, value=message.SerializeToString(deterministic=True))
    return resource_name(message), version, any_


# ------------------------------------------------------------------------------------------------
# State and streams


class TypeState:
    def __init__(self):
        self.version = ""
        self.generation = 0
        self.resources = {}  # name -> (version, Any)


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.types = {}  # type_url -> TypeState
        self.streams = {}  # id -> Stream
        self.nonces = itertools.count(1)
        self.stream_ids = itertools.count(1)

    def nonce(self):
        return str(next(self.nonces))

    def set(self, type_url, version, resources):
        with self.lock:
            ts = self.types.setdefault(type_url, TypeState())
            ts.version = version
            ts.generation += 1
            ts.resources = resources
            streams = list(self.streams.values())
        for stream in streams:
            stream.events.put(("changed", type_url))

    def drop_streams(self):
        with self.lock:
            streams = list(self.streams.values())
        for stream in streams:
            stream.events.put(("drop", None))


STATE = State()


class Stream:
    """One open RPC: a reader thread queues requests; the handler thread waits on the queue."""

    def __init__(self, api, request_iterator, context):
        self.api = api
        self.events = queue.Queue()
        with STATE.lock:
            self.id = next(STATE.stream_ids)
            STATE.streams[self.id] = self
        context.add_callback(lambda: self.events.put(("eof", None)))
        threading.Thread(target=self._read, args=(request_iterator,), daemon=True).start()

    def _read(self, request_iterator):
        try:
            for request in request_iterator:
                self.events.put(("request", request))
        except Exception:  # cancelled or reset: the stream is over either way
            pass
        self.events.put(("eof", None))

    def run(self, context, on_request, on_changed):
        opened = False
        try:
            while True:
                kind, value = self.events.get()
                if kind == "eof":
                    return
                if kind == "drop":
                    context.abort(grpc.StatusCode.UNAVAILABLE, "upstream dropped the stream")
                if kind == "request":
                    if not opened:
                        opened = True
                        node = value.node.id if value.HasField("node") else None
                        emit("stream_open", stream=self.id, api=self.api, node=node)
                    responses = on_request(value)
                else:
                    responses = on_changed(value)
                for response in responses:
                    yield response
        finally:
            with STATE.lock:
                STATE.streams.pop(self.id, None)
            if opened:
                emit("stream_close", stream=self.id)


def error_detail(request):
    if not request.HasField("error_detail"):
        return None
    return {"code": request.error_detail.code, "message": request.error_detail.message}


def check_type(api, type_url, context):
    if api.startswith("ecds") and type_url != ECDS_TYPE_URL:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ECDS serves only " + ECDS_TYPE_URL)
    if not type_url:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "type_url is required")


def sotw(api, request_iterator, context):
    stream = Stream(api, request_iterator, context)
    subs = {}  # type_url -> {"names": set|None (wildcard), "nonce": str|None, "sent": generation}

    def respond(type_url):
        sub = subs[type_url]
        with STATE.lock:
            ts = STATE.types.get(type_url)
            if ts is None:  # never set: nothing to say yet
                return []
            names = sorted(ts.resources if sub["names"] is None else
                           (n for n in sub["names"] if n in ts.resources))
            resources = [ts.resources[n][1] for n in names]
            sub["nonce"], sub["sent"] = STATE.nonce(), ts.generation
            response = discovery_pb2.DiscoveryResponse(
                version_info=ts.version, resources=resources, type_url=type_url,
                nonce=sub["nonce"])
        emit("response", stream=stream.id, type_url=type_url, version=ts.version,
             nonce=response.nonce, names=names, removed=[])
        return [response]

    def on_request(request):
        type_url = request.type_url or (ECDS_TYPE_URL if api.startswith("ecds") else "")
        emit("request", stream=stream.id, api=api, type_url=type_url,
             version_info=request.version_info, response_nonce=request.response_nonce,
             resource_names=list(request.resource_names), error_detail=error_detail(request))
        check_type(api, type_url, context)
        sub = subs.get(type_url)
        if sub is not None and request.response_nonce and request.response_nonce != sub["nonce"]:
            return []  # stale: answers an older response
        names = set(request.resource_names)
        if not names or "*" in names:
            names = None  # wildcard
        if sub is None:
            subs[type_url] = {"names": names, "nonce": None, "sent": None}
            return respond(type_url)
        if names != sub["names"] or sub["sent"] is None:
            sub["names"] = names
            return respond(type_url)
        return []  # ACK or NACK of the current subscription

    def on_changed(type_url):
        sub = subs.get(type_url)
        if sub is None:
            return []
        with STATE.lock:
            ts = STATE.types.get(type_url)
            current = ts.generation if ts else None
        return respond(type_url) if current != sub["sent"] else []

    return stream.run(context, on_request, on_changed)


def delta(api, request_iterator, context):
    stream = Stream(api, request_iterator, context)
    # type_url -> {"wildcard": bool, "names": set, "sent": {name: version or None (told absent)},
    #              "answered": bool}
    subs = {}

    def respond(type_url):
        sub = subs[type_url]
        with STATE.lock:
            ts = STATE.types.get(type_url)
            if ts is None:
                return []
            changed, removed = [], []
            for name in sorted(set(ts.resources) | set(sub["sent"]) | sub["names"]):
                wanted = sub["wildcard"] or name in sub["names"]
                if not wanted:
                    sub["sent"].pop(name, None)
                    continue
                if name in ts.resources:
                    version, any_ = ts.resources[name]
                    if sub["sent"].get(name) != version:
                        changed.append(discovery_pb2.Resource(
                            name=name, version=version, resource=any_))
                        sub["sent"][name] = version
                elif name in sub["names"]:  # asked for by name: say it does not exist, once
                    if name not in sub["sent"] or sub["sent"][name] is not None:
                        removed.append(name)
                        sub["sent"][name] = None
                elif name in sub["sent"]:  # known through the wildcard only
                    if sub["sent"].pop(name) is not None:
                        removed.append(name)
            if not changed and not removed and sub["answered"]:
                return []
            sub["answered"] = True
            response = discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=ts.version, resources=changed, type_url=type_url,
                removed_resources=removed, nonce=STATE.nonce())
        emit("response", stream=stream.id, type_url=type_url, version=ts.version,
             nonce=response.nonce, names=[r.name for r in changed], removed=removed)
        return [response]

    def on_request(request):
        type_url = request.type_url or (ECDS_TYPE_URL if api.startswith("ecds") else "")
        emit("request", stream=stream.id, api=api, type_url=type_url,
             response_nonce=request.response_nonce,
             resource_names_subscribe=list(request.resource_names_subscribe),
             resource_names_unsubscribe=list(request.resource_names_unsubscribe),
             initial_resource_versions=dict(request.initial_resource_versions),
             error_detail=error_detail(request))
        check_type(api, type_url, context)
        subscribe = set(request.resource_names_subscribe)
        unsubscribe = set(request.resource_names_unsubscribe)
        sub = subs.get(type_url)
        if sub is None:
            sub = subs[type_url] = {
                "wildcard": not subscribe or "*" in subscribe, "names": set(),
                "sent": dict(request.initial_resource_versions), "answered": False}
        elif "*" in subscribe:
            sub["wildcard"] = True
        if "*" in unsubscribe:
            sub["wildcard"] = False
        sub["names"] |= subscribe - {"*"}
        sub["names"] -= unsubscribe
        return respond(type_url)

    def on_changed(type_url):
        return respond(type_url) if type_url in subs else []

    return stream.run(context, on_request, on_changed)


class Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def StreamAggregatedResources(self, request_iterator, context):
        return sotw("ads-sotw", request_iterator, context)

    def DeltaAggregatedResources(self, request_iterator, context):
        return delta("ads-delta", request_iterator, context)


class Ecds(config_discovery_pb2_grpc.ExtensionConfigDiscoveryServiceServicer):
    def StreamExtensionConfigs(self, request_iterator, context):
        return sotw("ecds-sotw", request_iterator, context)

    def DeltaExtensionConfigs(self, request_iterator, context):
        return delta("ecds-delta", request_iterator, context)


# ------------------------------------------------------------------------------------------------
# Control


def command(line):
    seq = None
    try:
        cmd = json.loads(line)
        seq = cmd.get("seq")
        op = cmd.get("op")
        if op == "set":
            type_url, version = cmd["type_url"], cmd.get("version", "")
            resources = {}
            for spec in cmd.get("resources", []):
                name, res_version, any_ = parse_resource(type_url, version, spec)
                if name in resources:
                    raise ValueError("two resources named %s" % name)
                resources[name] = (res_version, any_)
            STATE.set(type_url, version, resources)
        elif op == "drop_streams":
            STATE.drop_streams()
        else:
            raise ValueError("unknown op %r" % (op,))
        emit("ok", seq=seq)
    except Exception as e:  # every failure is answered, the server keeps running
        emit("error", seq=seq, message="%s: %s" % (type(e).__name__, e))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=256),
        options=[
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a shared listener
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_ping_strikes", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", 1000),
        ])
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(Ads(), server)
    config_discovery_pb2_grpc.add_ExtensionConfigDiscoveryServiceServicer_to_server(Ecds(), server)
    port = server.add_insecure_port("%s:%d" % (args.host, args.port))
    if port == 0:
        sys.exit("cannot listen on %s:%d" % (args.host, args.port))
    server.start()

    def terminate(_signum, _frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, terminate)
    emit("listening", port=port)
    try:
        for line in sys.stdin:
            if line.strip():
                command(line)
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        server.stop(grace=None)
        with STATE.lock:
            streams = list(STATE.streams.values())
        for stream in streams:
            stream.events.put(("eof", None))
        sys.stdout.flush()
        # Handler threads of RPCs cancelled by stop() may still be unwinding; do not wait on them.
        os._exit(0)


if __name__ == "__main__":
    main()
