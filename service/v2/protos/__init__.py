"""gRPC stubs generated from grpc_predict_v2.proto (the Open Inference Protocol, from KServe's
docs/predict-api/v2 at commit aaac4e29) by grpcio-tools: ``make protos``. Do not edit them."""
