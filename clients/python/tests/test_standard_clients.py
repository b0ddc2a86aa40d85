"""The server seen through the standard Python gRPC tools: health checking and reflection."""
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def test_health_says_serving(server):
    with grpc.insecure_channel(server.addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "arbiter.v1.RewardService"):
            r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_describes_the_api(server):
    with grpc.insecure_channel(server.addr) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"arbiter.v1.RewardService", "grpc.health.v1.Health"} <= services
        f = db.FindFileContainingSymbol("arbiter.v1.RewardService")
        methods = {m.name for s in f.service if s.name == "RewardService" for m in s.method}
        assert methods == {"Score", "Rank", "ScoreStream", "GetModelInfo", "Tokenize"}
