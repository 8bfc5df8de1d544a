"""Protobuf modules generated from protos/extauthz/v1 when the package is built (see setup.py).

decision_pb2 contains DecisionRecord and Checkpoint, the messages of the decision log's JSON lines.
"""
