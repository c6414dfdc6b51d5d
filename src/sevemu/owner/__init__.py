"""sevemu.owner"""
