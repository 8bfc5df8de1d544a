"""The gRPC face: envoy.service.auth.v3.Authorization/Check.

Check only translates: the CheckRequest goes to the pipeline, the Decision comes back as a
CheckResponse. Every request gets a decision, never a gRPC error status; an overloaded server is the
exception, where grpcio itself returns RESOURCE_EXHAUSTED beyond `server.max_pending` waiting calls.

Check returns the CheckResponse already serialised by extauthz.response.ResponseEncoder, so the
method is registered with no response serializer and grpcio sends those bytes as they are.
"""

from __future__ import annotations

import grpc
from envoy.service.auth.v3 import external_auth_pb2

from extauthz.pipeline import Authorizer
from extauthz.response import ResponseEncoder

AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"


class AuthorizationServicer:
    def __init__(self, authorizer: Authorizer, token_header: str):
        self.authorizer = authorizer
        self.token_header = token_header
        self.encoder = ResponseEncoder(token_header)

    def Check(self, request: external_auth_pb2.CheckRequest,  # noqa: N802 - gRPC method name
              context: grpc.ServicerContext) -> bytes:
        """Decide one CheckRequest and return the serialised CheckResponse."""
        return self.encoder.encode(self.authorizer.check(request))


def add_authorization_servicer(servicer: AuthorizationServicer, server: grpc.Server) -> None:
    """Register Check on `server` as the generated add_AuthorizationServicer_to_server does, but
    with no response serializer."""
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            servicer.Check,
            request_deserializer=external_auth_pb2.CheckRequest.FromString,
            response_serializer=None,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(AUTHORIZATION_SERVICE, handlers),))
    server.add_registered_method_handlers(AUTHORIZATION_SERVICE, handlers)
