from twisted.application.service import ServiceMaker

agentd = ServiceMaker(
    "agentd",
    "agentd.tap",
    "Gateway between browsers and AI coding agents on project VMs",
    "agentd",
)
