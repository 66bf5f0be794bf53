from twisted.application.reactors import Reactor

mcpgw_epoll = Reactor(
    "mcpgw-epoll", "mcpgw._fast.reactor",
    "epoll without a log context per I/O event (Linux; twistd mcpgw's default, see mcpgw._fast.reactor)",
)
