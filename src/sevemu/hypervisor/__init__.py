"""sevemu.hypervisor"""
