"""The gRPC face: envoy.service.auth.v3.Authorization/Check.

Check only translates: the CheckRequest goes to the pipeline, the Decision comes back as a
CheckResponse. Every request gets a decision, never a gRPC error status; an overloaded server is the
exception, where grpcio itself returns RESOURCE_EXHAUSTED beyond `server.max_pending` waiting calls.
"""

from __future__ import annotations

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from extauthz.pipeline import Authorizer
from extauthz.response import build_check_response


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, authorizer: Authorizer, token_header: str):
        self.authorizer = authorizer
        self.token_header = token_header

    def Check(self, request: external_auth_pb2.CheckRequest,  # noqa: N802 - gRPC method name
              context: grpc.ServicerContext) -> external_auth_pb2.CheckResponse:
        decision = self.authorizer.check(request)
        return build_check_response(decision, self.token_header)
