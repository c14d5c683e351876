"""atp-gateway: available-to-promise between storefronts and the ERP."""
