from twisted.application.service import ServiceMaker

mcpgw = ServiceMaker("mcpgw", "mcpgw.tap", "An MCP gateway: stdio MCP servers over Streamable HTTP and SSE.", "mcpgw")
