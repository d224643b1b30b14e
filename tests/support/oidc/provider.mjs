// A real OpenID Provider for douane's end-to-end tests: panva/oidc-provider, certified.
//   node provider.mjs PORT '{"alice": ["engineering"]}' [ACCESS_TOKEN_TTL_SECONDS]
// Dynamic client registration, authorization code + PKCE, device flow, refresh tokens, and
// resource indicators (RFC 8707): an access token asked for a resource is a JWT whose aud is that
// resource, with the user's email and groups. Logins go through oidc-provider's development
// interactions (any password), which tests drive over HTTP.
import Provider from 'oidc-provider';

const [, , port, groupsJson, accessTtl] = process.argv;
const ACCESS_TTL = Number(accessTtl || 300);
const groups = JSON.parse(groupsJson || '{}');
const issuer = `http://127.0.0.1:${port}`;
const SCOPES = ['mcp:tools', 'mcp:admin'];

const provider = new Provider(issuer, {
  clients: [{
    client_id: 'douane-cli',
    token_endpoint_auth_method: 'none',
    application_type: 'native',
    redirect_uris: ['http://127.0.0.1/callback'],
    grant_types: ['authorization_code', 'refresh_token',
      'urn:ietf:params:oauth:grant-type:device_code'],
    response_types: ['code'],
  }],
  features: {
    devInteractions: { enabled: true },
    registration: { enabled: true },
    deviceFlow: { enabled: true },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: SCOPES.join(' '),
        accessTokenFormat: 'jwt',
        accessTokenTTL: ACCESS_TTL,
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  scopes: ['openid', 'offline_access', 'email', ...SCOPES],
  claims: { openid: ['sub'], email: ['email'] },
  pkce: { required: () => true },
  async findAccount(ctx, id) {
    return { accountId: id, async claims() { return { sub: id, email: `${id}@corp.example` }; } };
  },
  async extraTokenClaims(ctx, token) {
    return token.accountId
      ? { email: `${token.accountId}@corp.example`, groups: groups[token.accountId] || [] }
      : undefined;
  },
  async issueRefreshToken(ctx, client, code) {
    return client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access');
  },
  ttl: { AccessToken: ACCESS_TTL, AuthorizationCode: 60, RefreshToken: 3600, DeviceCode: 300,
    Interaction: 300, Session: 3600, Grant: 3600 },
});
// A device login polls every second (RFC 8628's default, without an interval, is 5 s): the tests
// wait for the CLI, not for its poll
provider.on('device_authorization.success', (ctx, body) => { body.interval = 1; });
provider.listen(Number(port), '127.0.0.1', () => console.log(`oidc-provider listening at ${issuer}`));
