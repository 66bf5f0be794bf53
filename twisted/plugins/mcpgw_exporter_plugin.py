from twisted.application.service import ServiceMaker

mcpgw_exporter = ServiceMaker(
    "mcpgw-exporter", "mcpgw.exporter", "Cluster-wide mcpgw metrics (instances, sessions) read from Redis.", "mcpgw-exporter"
)
