"""sevemu.hw"""
